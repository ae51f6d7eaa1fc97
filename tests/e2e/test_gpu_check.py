"""The GPU check's CPU dry run (scripts/gpu_check.py --cpu): every check runs at tiny sizes, so the
script that turns a GPU run into numbers never rots between GPU runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECKS = [
    "environment",
    "bounds",
    "backend",
    "hf_parity",
    "update",
    "logprobs",
    "offload",
    "checkpoint",
    "weight_sync",
    "update_larger",
    "convert",
]


@pytest.mark.e2e
def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--cpu", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-10000:]
    rows = {r["check"]: r for r in map(json.loads, (tmp_path / "gpu_check.jsonl").read_text().splitlines())}
    assert list(rows) == CHECKS and all(r["ok"] for r in rows.values()), rows
    assert rows["backend"]["backend"] == "cpu:gloo,cuda:gloo"
    assert rows["hf_parity"]["max_abs_diff_float32"] < 1e-4
    assert rows["update"]["update_tokens_per_s"] > 0 and rows["update"]["planner_train_gib"] > 0
    offload = rows["offload"]
    assert offload["weights_bit_exact"] and offload["params"]["bytes_moved"] >= rows["weight_sync"]["bytes"]
    assert rows["weight_sync"]["bytes"] == 4 * rows["update"]["params"]  # fp32 on CPU, tied: every tensor once
    assert rows["update_larger"]["params"] > rows["update"]["params"]
    assert rows["convert"]["cuda_initialized"] is False


def test_gpu_check_refuses_a_gpu_run_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "no CUDA device: pass --cpu for the dry run" in proc.stderr, proc.stderr
