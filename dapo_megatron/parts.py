"""The parts the DAPO loop runs on, as protocols, and the bundle the trainer takes.

:class:`~dapo_megatron.trainer.DapoTrainer` names no concrete part: it takes a :class:`Parts`,
which :class:`~dapo_megatron.builder.Builder` fills from the config (the one place that
imports ``MegatronActor``, ``VllmEngine``, ``RewardPool`` ...) and a unit test fills with
light stand-ins (tests/fakes.py), so the loop's logic is testable without a model or an engine.

Three parts are built late, by factories the trainer calls at its own point in the start-up
order: the engine (after a resume has loaded the actor and the actor has given back its
rollout-time memory: vLLM's start-up check wants that memory free), the weight sync (it needs
the engine) and the metrics tracker (it needs the resumed step).

This module is light (no torch, no megatron): the rollout engine's protocol lives next to its
data types in :mod:`dapo_megatron.rollout.engine`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from dapo_megatron.contract import ActorBatch, Group, PromptRecord, ScoredBatch
    from dapo_megatron.lifecycle import ColocatedLifecycle
    from dapo_megatron.reward.pool import Context
    from dapo_megatron.rollout.engine import RolloutEngine

__all__ = [
    "Actor",
    "Buffer",
    "Checkpoints",
    "Parts",
    "Sampler",
    "Scorer",
    "SyncResult",
    "Tokenizer",
    "Tracker",
    "WeightSync",
]


class Actor(Protocol):
    """The policy being trained (:class:`~dapo_megatron.actor.actor.MegatronActor`); collective calls."""

    update_count: int

    def compute_log_probs(
        self, batch: ActorBatch, *, compute_entropy: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def update(self, batch: ActorBatch) -> dict[str, float]: ...

    def offload(self, kinds: tuple[str, ...]) -> Any: ...

    def onload(self, kinds: tuple[str, ...]) -> Any: ...

    def require_resident(self, kinds: tuple[str, ...], what: str) -> None: ...


class SyncResult(Protocol):
    """What one sync reports (:class:`~dapo_megatron.weight_sync.sync.SyncStats`)."""

    seconds: float
    buckets: int
    stage_received_bytes: int

    @property
    def gbps(self) -> float: ...


class WeightSync(Protocol):
    """Actor -> engine (:class:`~dapo_megatron.weight_sync.sync.EngineWeightSync`); collective calls."""

    def sync(self) -> SyncResult:
        """Push the actor's current weights into the engine (its weight-update lifecycle)."""

    def verify(self) -> int:
        """Compare the engine's tensors with the actor's; raises on a mismatch; returns tensors checked."""


class Scorer(Protocol):
    """Scores responses against ground truths (:class:`~dapo_megatron.reward.pool.RewardPool`)."""

    def score(
        self, responses: Sequence[str], ground_truths: Sequence[str], contexts: Sequence[Context] | None = None
    ) -> ScoredBatch: ...

    def metrics(self) -> dict[str, float]: ...

    def close(self) -> None: ...


class Sampler(Protocol):
    """Which prompts each round draws (:class:`~dapo_megatron.data.sampler.ResumableSampler`)."""

    @property
    def epoch(self) -> int: ...

    def next_batch(self, batch_size: int) -> list[int]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Buffer(Protocol):
    """Dynamic sampling (:class:`~dapo_megatron.algo.dynamic_sampling.DynamicSamplingBuffer`)."""

    def begin_step(self, step: int) -> None: ...

    def should_generate(self) -> bool: ...

    def add_round(self, groups: Sequence[Group]) -> None: ...

    def take(self) -> list[Group]: ...

    def metrics(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Checkpoints(Protocol):
    """The actor's checkpoints with the trainer state beside them
    (:class:`~dapo_megatron.checkpoint.training.ActorCheckpoints`); collective calls."""

    def load(self, path: Path) -> dict[str, Any] | None:
        """Load the actor (and optimizer) from ``path``; returns the trainer state saved with it."""

    def save(self, step: int, extra_state: dict[str, Any], *, commit: bool) -> Any:
        """Write step ``step``; with ``commit=False`` returns the pending checkpoint for :meth:`commit`."""

    def commit(self, pending: Any) -> Path: ...

    def latest(self) -> Path | None:
        """The newest committed checkpoint, if any."""


class Tokenizer(Protocol):
    def batch_decode(self, sequences: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]: ...


class Tracker(Protocol):
    """Metrics rows (:class:`~dapo_megatron.observability.tracking.MetricsLogger`); rank 0 only."""

    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


@dataclass
class Parts:
    """Everything :class:`~dapo_megatron.trainer.DapoTrainer` runs on.

    ``rank``/``dp_rank``/``dp_size``: this process in the job (rank 0 logs); ``total_steps``:
    training steps of the run (the actor's LR schedule was built for it); ``resume_from``: the
    checkpoint chosen and checked at build time (``None``: a fresh start).
    """

    tokenizer: Tokenizer
    hf_config: Any
    pad_id: int
    train_set: Sequence[PromptRecord]
    val_set: Sequence[PromptRecord]
    actor: Actor
    lifecycle: ColocatedLifecycle
    pool: Scorer
    sampler: Sampler
    buffer: Buffer
    checkpoints: Checkpoints
    build_engine: Callable[[], RolloutEngine]
    build_weight_sync: Callable[[RolloutEngine], WeightSync]
    build_tracker: Callable[[int | None], Tracker]
    """Called on rank 0 only, with the resumed step (``None`` on a fresh start)."""
    total_steps: int
    rank: int = 0
    dp_rank: int = 0
    dp_size: int = 1
    resume_from: Path | None = None
