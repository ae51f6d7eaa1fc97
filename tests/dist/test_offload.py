"""Actor offload: 3 updates with params, grads and optimizer state swapped out and back between
phases equal 3 updates without, bit for bit, at TP1xDP2 and TP2 (distributed optimizer) and
without the distributed optimizer; the freed storage is really freed (workers/offload_worker.py)."""

from __future__ import annotations

import re

import pytest

from tests.dist._launch import run_torchrun


@pytest.mark.dist
def test_offloaded_training_is_bit_identical_and_frees_the_storage(tiny_qwen2_dirs, tmp_path):
    hf_dir = tiny_qwen2_dirs[0]
    proc = run_torchrun("offload_worker.py", [hf_dir], nproc=2, timeout=300)
    layouts = re.findall(r"OFFLOAD-OK (tp=\d dp=\d dist_opt=\d)", proc.stdout)
    assert layouts == ["tp=1 dp=2 dist_opt=1", "tp=2 dp=1 dist_opt=1", "tp=1 dp=2 dist_opt=0"], proc.stdout
