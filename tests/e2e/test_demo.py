"""The README's main command runs the whole pipeline and leaves metrics, plots and a summary."""

import subprocess
import sys
from pathlib import Path

import pytest

from dapo_megatron.tracking import read_jsonl

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
def test_demo_runs_end_to_end_and_resumes(tmp_path):
    run_dir = tmp_path / "demo"
    cmd = [
        sys.executable,
        "-m",
        "dapo_megatron.demo",
        "--run-dir",
        str(run_dir),
        "--sft-steps",
        "60",
        "trainer.total_training_steps=3",
        "trainer.test_freq=3",
        "data.val_max_samples=40",
        "trainer.checkpoint.save_freq=3",
        "algorithm.rollout_is.enable=true",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    assert "=== dapo-megatron demo summary ===" in proc.stdout
    assert "held-out accuracy (avg@k): step 0:" in proc.stdout
    rows = read_jsonl(run_dir / "dapo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert any(k.startswith("val-core/synthetic_arith/acc/mean@4") for k in rows[-1])
    for r in rows[1:]:
        assert r["weight_sync/verified_tensors"] > 0  # tiny_cpu.yaml verifies every sync
        assert r["rollout/actor_mismatch_max_abs_diff"] < 1e-3
        assert 0.9 < r["rollout_is/weight_mean"] < 1.1  # actor and engine share weights: w near 1
    assert (run_dir / "dapo" / "plots" / "dashboard.png").stat().st_size > 10_000
    assert (run_dir / "dapo" / "checkpoints" / "latest").read_text().strip() == "step_00000003"

    # A re-run reuses the warm-up and resumes from the last checkpoint: nothing left to train.
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-5000:] + again.stderr[-5000:]
    assert "supervised warm-up" not in again.stdout
    assert [r["step"] for r in read_jsonl(run_dir / "dapo" / "metrics.jsonl")] == [0, 1, 2, 3]
