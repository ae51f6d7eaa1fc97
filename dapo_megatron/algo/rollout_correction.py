"""Truncated importance sampling (TIS) for the rollout-vs-actor mismatch.

The engine samples from its own numerics (other kernels, bf16, a stale policy for
carried-over groups), so its token probabilities differ from the actor's. TIS
reweights each token's policy-gradient loss by ``w = min(pi_actor_old / pi_rollout, C)``
(detached), correcting the off-policy gap while the cap bounds the variance.

Why it needs no change to the loss: for any ``w > 0`` the clipped DAPO surrogate is
positively homogeneous in the advantage -- ``max(-wA r, -wA clip(r)) = w max(-A r,
-A clip(r))``, the dual clip ``min(-wA c, .)`` scales the same way, and ``sign(wA) =
sign(A)`` keeps every branch and clip-fraction metric unchanged. So passing the
token-level advantages ``A * w`` to :func:`dapo_megatron.algo.loss.policy_loss` is
exactly the weighted loss, through every aggregation mode and the global normaliser.
"""

from __future__ import annotations

import math

import torch

from dapo_megatron.algo.loss import masked_mean


def truncated_is_weights(
    old_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor, response_mask: torch.Tensor, *, cap: float
) -> torch.Tensor:
    """Per-token ``min(exp(old - rollout), cap)``, 1 outside the mask, no gradient; [B, T]."""
    if not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    if old_log_prob.shape != rollout_log_prob.shape or old_log_prob.shape != response_mask.shape:
        raise ValueError(
            f"shapes differ: old_log_prob {tuple(old_log_prob.shape)}, rollout_log_prob "
            f"{tuple(rollout_log_prob.shape)}, response_mask {tuple(response_mask.shape)}"
        )
    mask = response_mask.bool()
    log_ratio = torch.where(mask, old_log_prob.detach() - rollout_log_prob.detach(), torch.zeros_like(old_log_prob))
    return torch.exp(log_ratio.clamp(max=math.log(cap)))


def is_weight_metrics(weights: torch.Tensor, response_mask: torch.Tensor, *, cap: float) -> dict[str, float]:
    mask = response_mask.bool()
    if not bool(mask.any()):
        return {}
    return {
        "rollout_is/weight_mean": float(masked_mean(weights, mask)),
        "rollout_is/weight_min": float(weights[mask].min()),
        "rollout_is/capped_frac": float(masked_mean((weights >= cap).to(weights.dtype), mask)),
    }
