"""The megatron-core bugs behind the compat patches that need a process group are still there.

Each test runs megatron's code unpatched and asserts the bug; it fails once upstream fixes it,
which is the signal to delete the patch (docs/COMPAT.md, dapo_megatron.compat.PATCHES).
"""

from __future__ import annotations

import re

import pytest

from tests.dist._launch import run_torchrun
from tests.tiny_models import save_actor_qwen2

GROUP_TIMEOUT_S = 10


@pytest.mark.dist
def test_single_rank_write_failure_strands_the_other_rank(tmp_path):
    """Patch ``single-rank-writes-deferred``: rank 0 cannot write ``common.pt``."""
    proc = run_torchrun("compat_single_rank_write_worker.py", [tmp_path, GROUP_TIMEOUT_S], nproc=2, timeout=240)
    m = re.search(r"DEFERRED patched=(\d+)/(\d+) rank0='(.*)' rank1='(.*)' waited=(\S+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    patched0, patched1, rank0, rank1, waited = m.groups()
    # with the patch both ranks come back from the save and the error is held by rank 0 only
    assert (patched0, patched1) == ("1", "0"), proc.stdout
    assert "Is a directory" in rank0, proc.stdout
    # without it rank 1 never learns of rank 0's error: it waits out the group's timeout
    assert "Is a directory" not in rank1 and float(waited) >= 0.8 * GROUP_TIMEOUT_S, (
        f"megatron-core now agrees on single-rank write failures: the patch can go ({proc.stdout})"
    )


@pytest.mark.dist
def test_fully_reshardable_load_without_passthrough_raises_keyerror(tmp_path):
    """Patch ``adam-step-passthrough``: torch's Adam (no Apex/TE) keeps a per-parameter step."""
    hf_dir = save_actor_qwen2(tmp_path / "hf", False)
    proc = run_torchrun("compat_adam_step_worker.py", [hf_dir, tmp_path / "ckpt"], nproc=1, timeout=240)
    m = re.search(r"ADAM-STEP patched=(.*) unpatched=(.*)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    assert m.group(1) == "loaded", proc.stdout
    assert m.group(2) == "KeyError: 'step'", (
        f"megatron-core now loads fully_reshardable state into torch's Adam: the patch can go ({proc.stdout})"
    )
