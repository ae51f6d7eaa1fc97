"""GRPO outcome advantage: each response's reward relative to its prompt group.

DAPO has no critic; the baseline for a response is the mean reward of the
other samples for the same prompt, and dividing by the group's std makes the
step size independent of how spread the rewards of one prompt are.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch


def group_index(
    group_ids: Sequence[Hashable] | torch.Tensor,
) -> tuple[torch.Tensor, int]:
    """Map arbitrary group ids to dense indices ``0..G-1`` (first-seen order).

    Prompt uids are usually strings, which torch cannot group; one dict pass
    over the ids is the only per-sample Python work, the statistics themselves
    are computed with scatter-adds.
    """
    if isinstance(group_ids, torch.Tensor):
        if group_ids.dim() != 1:
            raise ValueError(f"group_ids tensor must be 1-D, got shape {tuple(group_ids.shape)}")
        _, inverse = torch.unique(group_ids, return_inverse=True)
        num_groups = int(inverse.max().item()) + 1 if inverse.numel() else 0
        return inverse, num_groups
    dense: dict[Hashable, int] = {}
    index = [dense.setdefault(gid, len(dense)) for gid in group_ids]
    return torch.tensor(index, dtype=torch.long), len(dense)


def grpo_advantage(
    scores: torch.Tensor,
    group_ids: Sequence[Hashable] | torch.Tensor,
    *,
    eps: float = 1e-6,
    norm_by_std: bool = True,
) -> torch.Tensor:
    """``A_i = (R_i - mean_g) / (std_g + eps)``, or ``R_i - mean_g`` without std.

    std is the unbiased (n - 1) one, as ``torch.std``, to match the reference
    numbers. A group of size 1 uses mean 0 and std 1 (its reward passes through,
    divided by ``1 + eps``): a lone sample has no baseline to compare against,
    and keeping the raw reward is the reference behaviour. Statistics are
    computed in float64 so large groups of near-equal rewards do not pick up
    spurious advantages from rounding; the result has ``scores``' dtype.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [B], got shape {tuple(scores.shape)}")
    if len(group_ids) != scores.shape[0]:
        raise ValueError(f"group_ids has {len(group_ids)} entries, scores has {scores.shape[0]}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    index, num_groups = group_index(group_ids)
    index = index.to(scores.device)
    values = scores.to(torch.float64)

    counts = torch.zeros(num_groups, dtype=torch.float64, device=scores.device)
    counts.index_add_(0, index, torch.ones_like(values))
    sums = torch.zeros_like(counts).index_add_(0, index, values)
    singleton = counts == 1
    mean = torch.where(singleton, torch.zeros_like(sums), sums / counts.clamp_min(1))

    centred = values - mean[index]
    advantages = centred
    if norm_by_std:
        # Two-pass variance: accurate even when the rewards are far from 0.
        squares = torch.zeros_like(counts).index_add_(0, index, centred.square())
        std = torch.sqrt(squares / (counts - 1).clamp_min(1))
        std = torch.where(singleton, torch.ones_like(std), std)
        advantages = centred / (std[index] + eps)
    return advantages.to(scores.dtype)
