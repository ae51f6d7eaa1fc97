"""The colocated memory lifecycle: which state is on the device in each phase of a step.

Actor and engine share every GPU, so a step is a sequence of phases, each with its own set of
residents.  This module is the one description of that sequence: the trainer moves between
phases with :meth:`ColocatedLifecycle.enter`, and the planner (:mod:`dapo_megatron.planning.memory`)
sums the bytes of the same residents per phase, so what is checked before a run is what runs.

One step, as the trainer runs it::

    ROLLOUT  generate (dynamic sampling: as many rounds as it needs)
    TRAIN    the engine sleeps; the actor onloads params, grads and optimizer state;
             old log-probs, the update, then the checkpoint when due (the engine still asleep)
    SYNC     the actor offloads grads and optimizer state as configured, empty_cache;
             the engine wakes its weights only; weight sync
    VERIFY   (rollout.weight_sync.verify) the engine wakes its KV cache; checksums and the
             function probe, which needs the actor's params next to the engine
    ROLLOUT  the actor offloads params as configured, empty_cache; the engine wakes its KV
             cache; validation when due; the next step's generation

The checkpoint is saved before the offload rather than after it: the save reads the params
and the optimizer state, so saving first avoids a second round trip of both.

Transitions are derived, not listed: entering a phase releases what the phase does not hold
(engine sleep, actor offloads, then ``empty_cache`` so the freed blocks reach the driver) and
then acquires what it does (engine wakes by tag, actor onloads).  Releasing first is what lets
the two share the memory.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from dapo_megatron.config import OFFLOAD_KINDS

__all__ = ["Phase", "Residency", "LifecyclePlan", "Action", "ColocatedLifecycle"]

logger = logging.getLogger(__name__)


class Phase(enum.Enum):
    ROLLOUT = "rollout"  # generation and validation
    TRAIN = "train"  # old log-probs, the update, the checkpoint save
    SYNC = "sync"  # actor -> engine weight sync
    VERIFY = "verify"  # checksums + function probe after a sync


@dataclass(frozen=True)
class Residency:
    """What is on the device: the engine's weights and KV cache, the actor's three kinds."""

    engine_weights: bool
    engine_kv: bool
    params: bool
    grads: bool
    optimizer: bool

    def actor_kinds(self) -> tuple[str, ...]:
        return tuple(k for k in OFFLOAD_KINDS if getattr(self, k))


@dataclass(frozen=True)
class LifecyclePlan:
    """The phase -> residency table for one config (shared by trainer and planner)."""

    free_cache_engine: bool = True
    sleep_level: int = 1
    offload_params: bool = False
    offload_grads: bool = False
    offload_optimizer: bool = False
    verify: bool = False

    @classmethod
    def from_config(cls, cfg) -> LifecyclePlan:
        off = cfg.actor.offload
        return cls(
            free_cache_engine=cfg.rollout.free_cache_engine,
            sleep_level=cfg.rollout.sleep_level,
            offload_params=off.params,
            offload_grads=off.grads,
            offload_optimizer=off.optimizer,
            verify=cfg.rollout.weight_sync.verify,
        )

    def step_phases(self) -> tuple[Phase, ...]:
        """The phases of one training step, in order (ROLLOUT first: generation)."""
        sync = (Phase.SYNC, Phase.VERIFY) if self.verify else (Phase.SYNC,)
        return (Phase.ROLLOUT, Phase.TRAIN, *sync)

    def residency(self, phase: Phase) -> Residency:
        awake = not self.free_cache_engine
        if phase is Phase.ROLLOUT:
            return Residency(True, True, not self.offload_params, not self.offload_grads, not self.offload_optimizer)
        if phase is Phase.TRAIN:
            return Residency(awake, awake, True, True, True)
        if phase is Phase.SYNC:
            return Residency(True, awake, True, not self.offload_grads, not self.offload_optimizer)
        if phase is Phase.VERIFY:
            return Residency(True, True, True, not self.offload_grads, not self.offload_optimizer)
        raise ValueError(f"unknown phase {phase!r}")


@dataclass(frozen=True)
class Action:
    """One lifecycle operation: ``engine.sleep``, ``engine.wake``, ``actor.offload``,
    ``actor.onload`` or ``empty_cache``; ``arg`` is the level, tag or kinds."""

    op: str
    arg: tuple = ()

    def __str__(self) -> str:
        return f"{self.op}({', '.join(map(str, self.arg))})" if self.arg else self.op


def transitions(src: Residency, dst: Residency, *, sleep_level: int, engine: bool = True) -> list[Action]:
    """The ordered operations that take the device from ``src`` to ``dst``.

    Releases come first (the engine sleeps whole: vLLM puts weights and KV cache to sleep
    together; the actor offloads), then ``empty_cache`` when the actor freed anything or the
    engine is about to wake, then the acquisitions (the engine wakes its weights before its KV
    cache; the actor onloads).
    """
    actions: list[Action] = []
    if engine and dst.engine_kv and not dst.engine_weights:
        raise ValueError("the engine cannot hold its KV cache without its weights")
    engine_on = (src.engine_weights, src.engine_kv) if engine else (False, False)
    if engine and ((engine_on[0] and not dst.engine_weights) or (engine_on[1] and not dst.engine_kv)):
        actions.append(Action("engine.sleep", (sleep_level,)))
        engine_on = (False, False)
    release = tuple(k for k in OFFLOAD_KINDS if getattr(src, k) and not getattr(dst, k))
    if release:
        actions.append(Action("actor.offload", release))
    wake = [
        tag
        for tag, want, have in (
            ("weights", dst.engine_weights, engine_on[0]),
            ("kv_cache", dst.engine_kv, engine_on[1]),
        )
        if engine and want and not have
    ]
    # The allocator keeps what the actor freed (offloaded state, the update's activations)
    # cached for PyTorch; the engine can only take it once it is handed back.
    if release or wake:
        actions.append(Action("empty_cache"))
    actions.extend(Action("engine.wake", (tag,)) for tag in wake)
    acquire = tuple(k for k in OFFLOAD_KINDS if getattr(dst, k) and not getattr(src, k))
    if acquire:
        actions.append(Action("actor.onload", acquire))
    return actions


class ColocatedLifecycle:
    """Executes :class:`LifecyclePlan` on one actor and (once attached) one engine.

    ``empty_cache`` performs that action (:func:`dapo_megatron.actor.offload.empty_device_cache`,
    passed in: the planner imports this module without torch).  ``observers`` are called with every
    executed :class:`Action` (the lifecycle-order test records them; nothing in the package depends on them).
    """

    def __init__(
        self,
        plan: LifecyclePlan,
        actor,
        empty_cache: Callable[[], None],
        observers: list[Callable[[Action], None]] | None = None,
    ) -> None:
        self.plan = plan
        self.actor = actor
        self.empty_cache = empty_cache
        self.engine = None
        self.observers = list(observers or [])
        # before an engine exists the actor holds everything (it was just built or loaded)
        self.current = Residency(False, False, True, True, True)
        self.phase: Phase | None = None
        self.seconds: dict[str, float] = {}

    def attach_engine(self, engine) -> None:
        """A freshly built engine is awake (weights and KV cache allocated)."""
        self.engine = engine
        self.current = Residency(True, True, self.current.params, self.current.grads, self.current.optimizer)

    def enter(self, phase: Phase) -> list[Action]:
        """Release and acquire what ``phase`` needs; returns the actions taken."""
        dst = self.plan.residency(phase)
        if self.engine is None:
            dst = Residency(False, False, dst.params, dst.grads, dst.optimizer)
        actions = transitions(self.current, dst, sleep_level=self.plan.sleep_level, engine=self.engine is not None)
        for action in actions:
            t0 = time.perf_counter()
            self._execute(action)
            key = action.op.replace(".", "_")
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t0
            for observe in self.observers:
                observe(action)
        self.current = dst
        self.phase = phase
        return actions

    def pop_timings(self) -> dict[str, float]:
        """Seconds per operation since the last call, and their ``total`` (``timing_s/lifecycle/*``)."""
        out, self.seconds = self.seconds, {}
        out["total"] = sum(out.values())
        return out

    def _execute(self, action: Action) -> None:
        if action.op == "engine.sleep":
            self.engine.sleep(level=action.arg[0])
        elif action.op == "engine.wake":
            self.engine.wake_up(tags=list(action.arg))
        elif action.op == "actor.offload":
            self.actor.offload(action.arg)
        elif action.op == "actor.onload":
            self.actor.onload(action.arg)
        elif action.op == "empty_cache":
            self.empty_cache()
        else:
            raise ValueError(f"unknown lifecycle action {action}")
