"""The README's demo command runs, and its stages keep their promises on real data."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
def test_demo_runs_and_dynamic_sampling_trains_only_informative_groups(tmp_path):
    run_dir = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "dapo_megatron.demo", "--run-dir", str(run_dir), "--steps", "4", "rollout.n=6"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "=== summary" in proc.stdout
    assert (run_dir / "plots" / "dashboard.png").stat().st_size > 10_000
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    carried = 0.0
    for r in rows:
        assert r["demo/trained_groups"] == 8  # tiny_cpu.yaml train_batch_size
        assert r["demo/uninformative_trained_groups"] == 0
        assert r["dynamic_sampling/trained_samples"] == 8 * 6
        assert r["dynamic_sampling/generated_samples"] == r["train/num_gen_batches"] * 16 * 6
        assert r["dynamic_sampling/carried_in_groups"] <= carried
        # Nothing kept is lost: kept this step + carried in = trained + carried out + expired.
        assert (
            r["dynamic_sampling/kept_groups"] + carried
            == 8 + r["dynamic_sampling/carried_groups"] + r["dynamic_sampling/expired_groups"]
        )
        carried = r["dynamic_sampling/carried_groups"]
        assert 0.0 <= r["actor/pg_clipfrac"] <= 1.0
        assert r["reward/num_timeouts"] == 0 and r["reward/num_errors"] == 0
