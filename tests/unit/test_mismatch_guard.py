"""The mismatch guard's decisions, with the trainer's parts replaced by light stand-ins.

The real parts run in tests/e2e/test_tied_training.py (the guard stopping a run whose LM head
went stale) and tests/dist/test_tied_sync.py; here the branches that a real drift does not
reach are pinned: a gap whose weights re-verify fine, then persists, stops the run.
"""

from __future__ import annotations

import logging

import pytest

from dapo_megatron.actor.offload import empty_device_cache
from dapo_megatron.config import DapoConfig
from dapo_megatron.lifecycle import ColocatedLifecycle, LifecyclePlan, Phase
from dapo_megatron.rollout.mismatch import (
    FP32_MAX_MISMATCH,
    LOW_PRECISION_MAX_MISMATCH,
    RolloutMismatchError,
    max_mismatch_for,
)
from dapo_megatron.trainer import DapoTrainer
from tests.fakes import fake_parts


class _Engine:
    def __init__(self, log: list):
        self.log = log

    def sleep(self, level):
        self.log.append(f"sleep({level})")

    def wake_up(self, tags):
        self.log.append(f"wake({','.join(tags)})")


def _trainer(verify_calls: list, plan: LifecyclePlan | None = None, log: list | None = None) -> DapoTrainer:
    cfg = DapoConfig()
    trainer = DapoTrainer(cfg, fake_parts(cfg))
    plan = plan or LifecyclePlan(free_cache_engine=False)
    trainer.parts.lifecycle = ColocatedLifecycle(plan, None, empty_device_cache)
    trainer.parts.lifecycle.attach_engine(_Engine(log if log is not None else []))
    trainer.parts.lifecycle.enter(Phase.TRAIN)  # the guard runs between the old log-probs and the update
    trainer.max_mismatch = 1e-4
    trainer._mismatch_breaches = 0
    trainer.step = 7

    def verify():
        verify_calls.append(trainer.step)
        return {"weight_sync/verified_tensors": 12.0, "weight_sync/probe_mean_abs_diff": 3e-7}

    trainer._verify_engine = verify
    return trainer


def test_healthy_gap_passes_without_reverifying():
    calls: list = []
    trainer = _trainer(calls)
    assert trainer._guard_mismatch(5e-5) == {"rollout/mismatch_breaches": 0.0}
    assert calls == []


def test_one_breach_reverifies_and_logs_a_recovered_gap_resets(caplog):
    calls: list = []
    trainer = _trainer(calls)
    with caplog.at_level(logging.ERROR):
        assert trainer._guard_mismatch(2e-3) == {"rollout/mismatch_breaches": 1.0}
    assert calls == [7]
    assert "above rollout.max_mismatch=1.0e-04" in caplog.text and "re-verification passed" in caplog.text
    trainer.step = 8
    assert trainer._guard_mismatch(1e-6) == {"rollout/mismatch_breaches": 0.0}
    trainer.step = 9
    trainer._guard_mismatch(2e-3)  # a new first breach: verified again, not a stop
    assert calls == [7, 9]


def test_a_gap_that_persists_after_verification_stops_naming_causes():
    calls: list = []
    trainer = _trainer(calls)
    trainer._guard_mismatch(2e-3)
    trainer.step = 8
    with pytest.raises(RolloutMismatchError, match=r"stayed above rollout.max_mismatch=1.0e-04 for 2 steps") as e:
        trainer._guard_mismatch(3e-3)
    assert "tied LM head" in str(e.value) and "rollout.weight_sync.verify=true" in str(e.value)
    assert calls == [7]  # verified once


def test_failed_reverification_propagates():
    trainer = _trainer([])

    def broken():
        raise RuntimeError("weight verification failed on rank 0: lm_head.weight")

    trainer._verify_engine = broken
    with pytest.raises(RuntimeError, match="lm_head.weight"):
        trainer._guard_mismatch(1.0)


@pytest.mark.parametrize("level", [1, 2])
def test_reverification_wakes_the_sleeping_engine_and_refills_discarded_weights(level):
    log: list = []
    trainer = _trainer(log, LifecyclePlan(sleep_level=level), log)
    trainer._verify_engine = lambda: (
        log.append("verify")
        or {
            "weight_sync/verified_tensors": 1.0,
            "weight_sync/probe_mean_abs_diff": 0.0,
        }
    )
    trainer._sync_weights = lambda: log.append("sync") or {}
    trainer._guard_mismatch(1.0)
    refill = ["wake(weights)", "sync"] if level == 2 else ["wake(weights)"]
    # level 1: the engine's own weights come back from host memory; level 2 discarded them
    assert log == [f"sleep({level})", *refill, "wake(kv_cache)", "verify", f"sleep({level})"]
    assert trainer.parts.lifecycle.phase is Phase.TRAIN


def test_threshold_defaults_follow_the_dtypes():
    assert max_mismatch_for(None, "float32", "float32") == FP32_MAX_MISMATCH
    assert max_mismatch_for(None, "bfloat16", "float32") == LOW_PRECISION_MAX_MISMATCH
    assert max_mismatch_for(None, "float32", "bfloat16") == LOW_PRECISION_MAX_MISMATCH
    assert max_mismatch_for(0.5, "float32", "float32") == 0.5
