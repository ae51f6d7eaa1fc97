"""The phase model: what each phase holds, and the ordered operations between phases.

The trainer executes these transitions and the planner sums the same residencies, so the
order here is the order a GPU run follows (the e2e lifecycle test records it on the real
trainer).
"""

from __future__ import annotations

import pytest

from dapo_megatron.actor.offload import empty_device_cache
from dapo_megatron.config import DapoConfig
from dapo_megatron.lifecycle import Action, ColocatedLifecycle, LifecyclePlan, Phase, Residency, transitions

ALL_OFF = LifecyclePlan(offload_params=True, offload_grads=True, offload_optimizer=True, verify=True)


def _walk(plan: LifecyclePlan, phases: list[Phase]) -> list[str]:
    steps, cur = [], plan.residency(Phase.ROLLOUT)
    for phase in phases:
        dst = plan.residency(phase)
        steps += [str(a) for a in transitions(cur, dst, sleep_level=plan.sleep_level)]
        steps.append(f"<{phase.value}>")
        cur = dst
    return steps


def test_one_step_with_everything_offloaded_follows_the_colocated_order():
    step = _walk(ALL_OFF, [Phase.TRAIN, Phase.SYNC, Phase.VERIFY, Phase.ROLLOUT])
    assert step == [
        "engine.sleep(1)",  # the engine gives back weights and KV cache first
        "actor.onload(params, grads, optimizer)",
        "<train>",  # old log-probs, update, checkpoint
        "actor.offload(grads, optimizer)",
        "empty_cache",  # before the engine takes memory back
        "engine.wake(weights)",
        "<sync>",
        "empty_cache",  # the sync's buffers
        "engine.wake(kv_cache)",
        "<verify>",  # the probe needs the actor's params and the engine's KV cache
        "actor.offload(params)",
        "empty_cache",
        "<rollout>",
    ]


def test_without_offload_the_engine_still_sleeps_and_the_cache_is_emptied_before_it_wakes():
    plan = LifecyclePlan(sleep_level=2)
    assert _walk(plan, [Phase.TRAIN, Phase.SYNC, Phase.ROLLOUT]) == [
        "engine.sleep(2)",
        "<train>",
        "empty_cache",  # the update's activations stay cached by PyTorch otherwise
        "engine.wake(weights)",
        "<sync>",
        "empty_cache",
        "engine.wake(kv_cache)",
        "<rollout>",
    ]


def test_an_engine_that_never_sleeps_moves_nothing():
    plan = LifecyclePlan(free_cache_engine=False)
    assert _walk(plan, [Phase.TRAIN, Phase.SYNC, Phase.ROLLOUT]) == ["<train>", "<sync>", "<rollout>"]


def test_residency_per_phase_with_verls_offload_recipe():
    r = ALL_OFF.residency
    assert r(Phase.ROLLOUT) == Residency(True, True, False, False, False)
    assert r(Phase.TRAIN) == Residency(False, False, True, True, True)
    assert r(Phase.SYNC) == Residency(True, False, True, False, False)
    assert r(Phase.VERIFY) == Residency(True, True, True, False, False)
    assert ALL_OFF.step_phases() == (Phase.ROLLOUT, Phase.TRAIN, Phase.SYNC, Phase.VERIFY)


def test_plan_from_config_reads_the_offload_and_sleep_settings():
    cfg = DapoConfig()
    cfg.actor.offload.params = True
    cfg.actor.offload.optimizer = True
    cfg.rollout.sleep_level = 2
    plan = LifecyclePlan.from_config(cfg)
    assert (plan.offload_params, plan.offload_grads, plan.offload_optimizer, plan.sleep_level) == (True, False, True, 2)


def test_kv_cache_without_weights_is_refused():
    with pytest.raises(ValueError, match="KV cache without its weights"):
        transitions(Residency(True, True, True, True, True), Residency(False, True, True, True, True), sleep_level=1)


class _Recorder:
    def __init__(self):
        self.calls = []

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags):
        self.calls.append(("wake", tuple(tags)))


class _Stats:
    total_bytes = 0


class _Actor(_Recorder):
    def offload(self, kinds):
        self.calls.append(("offload", kinds))
        return _Stats()

    def onload(self, kinds):
        self.calls.append(("onload", kinds))
        return _Stats()


def test_controller_before_the_engine_exists_moves_only_the_actor():
    actor, engine = _Actor(), _Recorder()
    seen: list[Action] = []
    life = ColocatedLifecycle(ALL_OFF, actor, empty_device_cache, observers=[seen.append])
    life.enter(Phase.ROLLOUT)  # start-up: the actor was just built, the engine comes next
    assert actor.calls == [("offload", ("params", "grads", "optimizer"))]
    life.attach_engine(engine)
    life.enter(Phase.SYNC)  # start-up sync (resume / dummy weights): KV cache released first
    assert engine.calls == [("sleep", 1), ("wake", ("weights",))]
    assert actor.calls[-1] == ("onload", ("params",))
    assert [a.op for a in seen] == [
        "actor.offload",
        "empty_cache",
        "engine.sleep",
        "empty_cache",
        "engine.wake",
        "actor.onload",
    ]
    timings = life.pop_timings()
    assert set(timings) >= {"engine_sleep", "engine_wake", "actor_offload", "actor_onload", "empty_cache", "total"}
