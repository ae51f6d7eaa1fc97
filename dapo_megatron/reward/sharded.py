"""Score one round across all ranks: each scores a slice, everyone gets the whole.

Why: every rank holds the full round (the engine gathers it), and the dynamic-sampling
buffer must make the same decision on every rank. Scoring everything everywhere would
multiply verifier work by the world size; slicing and all-gathering keeps it at one pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch.distributed as dist

from dapo_megatron.contract import ScoredBatch
from dapo_megatron.reward.pool import Context, RewardPool


def score_sharded(
    pool: RewardPool,
    responses: Sequence[str],
    ground_truths: Sequence[str],
    contexts: Sequence[Context] | None = None,
    *,
    group=None,
) -> ScoredBatch:
    """Collective over ``group`` (default world) when distributed; plain ``pool.score`` otherwise."""
    if len(responses) != len(ground_truths):
        raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return pool.score(responses, ground_truths, contexts)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    bounds = [len(responses) * r // world for r in range(world + 1)]
    lo, hi = bounds[rank], bounds[rank + 1]
    mine = pool.score(responses[lo:hi], ground_truths[lo:hi], None if contexts is None else contexts[lo:hi])
    parts: list[ScoredBatch | None] = [None] * world
    dist.all_gather_object(parts, mine, group=group)
    fields = [f.name for f in dataclasses.fields(ScoredBatch)]
    return ScoredBatch(**{f: [x for part in parts for x in getattr(part, f)] for f in fields})
