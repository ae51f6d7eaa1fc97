"""Rollout replica layout: which ranks form one vLLM replica and which prompts it serves.

The rollout tensor-parallel size is independent of the actor's TP/PP: it only has to
divide the world.  Replica ``r`` is ranks ``[r*tp, (r+1)*tp)`` -- the same contiguous
grouping vLLM's ``initialize_model_parallel`` builds under ``external_launcher`` (TP is
the fastest-varying dimension), so our bookkeeping and vLLM's groups agree.

Prompts are split into ``dp`` contiguous, balanced slices (the first ``P % dp``
replicas get one extra), so gathering the replicas' outputs in replica order restores
prompt order without any index exchange.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RolloutLayout", "prompt_slices"]


def prompt_slices(num_prompts: int, dp: int) -> list[range]:
    """Contiguous balanced slices of ``range(num_prompts)`` for ``dp`` replicas (some may be empty)."""
    if dp < 1:
        raise ValueError(f"dp must be >= 1, got {dp}")
    if num_prompts < 0:
        raise ValueError(f"num_prompts must be >= 0, got {num_prompts}")
    base, extra = divmod(num_prompts, dp)
    out, start = [], 0
    for r in range(dp):
        size = base + (1 if r < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


@dataclass(frozen=True)
class RolloutLayout:
    """This rank's place in the rollout replica grid."""

    world_size: int
    rank: int
    tp: int

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ValueError(f"rollout.tensor_model_parallel_size must be >= 1, got {self.tp}")
        if self.world_size % self.tp:
            raise ValueError(
                f"rollout.tensor_model_parallel_size={self.tp} does not divide the world size {self.world_size}"
            )
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world of size {self.world_size}")

    @property
    def dp(self) -> int:
        """Number of independent replicas."""
        return self.world_size // self.tp

    @property
    def replica(self) -> int:
        return self.rank // self.tp

    @property
    def rank_in_replica(self) -> int:
        return self.rank % self.tp

    @property
    def is_replica_leader(self) -> bool:
        return self.rank_in_replica == 0

    def my_prompts(self, num_prompts: int) -> range:
        """Global indices of the prompts this rank's replica generates for."""
        return prompt_slices(num_prompts, self.dp)[self.replica]
