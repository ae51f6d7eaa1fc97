"""Overlapped DDP gradient reduction in many buckets: checkpoints stay exact
(workers/ddp_buckets_worker.py), and the megatron-core fix that makes them so is still needed."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _launch import run_torchrun  # noqa: E402
from test_actor_update import _save_tiny_qwen2  # noqa: E402


@pytest.mark.dist
def test_multi_bucket_checkpoint_round_trip_is_exact_only_with_the_fix(tmp_path):
    hf_dir = _save_tiny_qwen2(tmp_path / "hf", False)
    proc = run_torchrun("ddp_buckets_worker.py", [hf_dir, tmp_path / "ckpt"], nproc=2, timeout=300)
    m = re.search(r"BUCKETS-OK buckets=(\d+) patched=(\S+) unpatched=(\S+)", proc.stdout)
    assert m and int(m.group(1)) > 4 and float(m.group(2)) == 0.0 and float(m.group(3)) > 1e-2, proc.stdout
