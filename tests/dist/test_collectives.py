"""The collective helpers and their callers on 2 gloo ranks (``workers/collectives_worker.py``).

What a GPU run adds (NCCL next to gloo) cannot run here; the unit test
``tests/unit/test_distributed.py`` pins that a CUDA run asks for ``cpu:gloo,cuda:nccl``, which is
what makes these same CPU-tensor agreements legal there.
"""

from __future__ import annotations

import pytest

from tests.dist._launch import run_torchrun

CHECKS = [
    "default group uses the policy backend",
    "megatron's DP group inherits the backend",
    "world: any_true sees rank 1's True",
    "dp: all_sum",
    "one-rank group: all_sum is local",
    "trainer: a signal on rank 1 stops every rank",
    "trainer: pool metrics are summed over ranks",
    "trainer: a non-finite log-prob on rank 1 stops every rank",
    "trainer: rollout-correction metrics cover every rank's shard",
    "checkpoint: rank 0's failure raises on every rank",
    "checkpoint: success passes",
]


@pytest.mark.dist
def test_collective_helpers_and_callers(tmp_path):
    stdout = run_torchrun("collectives_worker.py", [str(tmp_path)], nproc=2, timeout=240).stdout
    for what in CHECKS:
        assert f"CHECK {what}" in stdout, (what, stdout)
