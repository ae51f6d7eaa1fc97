"""Overlapped DDP gradient reduction in many buckets: checkpoints stay exact
(workers/ddp_buckets_worker.py), and the megatron-core fix that makes them so is still needed."""

from __future__ import annotations

import re

import pytest

from tests.dist._launch import run_torchrun


@pytest.mark.dist
def test_multi_bucket_checkpoint_round_trip_is_exact_only_with_the_fix(tiny_qwen2_dirs, tmp_path):
    hf_dir = tiny_qwen2_dirs[0]
    proc = run_torchrun("ddp_buckets_worker.py", [hf_dir, tmp_path / "ckpt"], nproc=2, timeout=300)
    m = re.search(r"BUCKETS-OK buckets=(\d+) patched=(\S+) unpatched=(\S+)", proc.stdout)
    assert m and int(m.group(1)) > 4 and float(m.group(2)) == 0.0 and float(m.group(3)) > 1e-2, proc.stdout
