"""Actor offload: 3 updates with params, grads and optimizer state swapped out and back between
phases equal 3 updates without, bit for bit, at TP1xDP2 and TP2 (distributed optimizer) and
without the distributed optimizer; the freed storage is really freed (workers/offload_worker.py)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _launch import run_torchrun  # noqa: E402
from test_actor_update import _save_tiny_qwen2  # noqa: E402


@pytest.mark.dist
def test_offloaded_training_is_bit_identical_and_frees_the_storage(tmp_path):
    hf_dir = _save_tiny_qwen2(tmp_path / "hf", False)
    proc = run_torchrun("offload_worker.py", [hf_dir], nproc=2, timeout=300)
    layouts = re.findall(r"OFFLOAD-OK (tp=\d dp=\d dist_opt=\d)", proc.stdout)
    assert layouts == ["tp=1 dp=2 dist_opt=1", "tp=2 dp=1 dist_opt=1", "tp=1 dp=2 dist_opt=0"], proc.stdout
