"""Rollout-vs-actor log-prob mismatch over generated tokens.

The engine samples with its own kernels (bf16, fused ops, different reduction order),
so its log-probs of the sampled tokens differ from the actor's recomputation even with
identical weights.  Large or growing mismatch means off-policy drift (or a broken weight
sync), so it is logged every step.  Conventions: ``p`` = actor (the policy being
trained), ``q`` = engine (the sampler); only tokens where ``mask`` is true count.

Metrics (means over valid tokens):

* ``mean_abs_diff``: E|log p - log q|
* ``max_abs_diff``
* ``kl_k1``: E_q[log q - log p] (unbiased for KL(q||p) under samples from q; can be < 0)
* ``kl_k3``: E_q[r - 1 - log r] with r = p/q (Schulman's low-variance, always >= 0)
* ``ppl_ratio``: exp(E[log q - log p]) -- how much more likely the engine found its samples
"""

from __future__ import annotations

import torch

__all__ = [
    "FP32_MAX_MISMATCH",
    "LIKELY_CAUSES",
    "LOW_PRECISION_MAX_MISMATCH",
    "RolloutMismatchError",
    "logprob_mismatch",
    "max_mismatch_for",
]


def logprob_mismatch(actor_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor) -> dict:
    """Mismatch metrics (floats) over tokens where ``mask`` is true; all three tensors share a shape."""
    if actor_logprobs.shape != rollout_logprobs.shape or actor_logprobs.shape != mask.shape:
        raise ValueError(
            f"shape mismatch: actor_logprobs {tuple(actor_logprobs.shape)}, rollout_logprobs "
            f"{tuple(rollout_logprobs.shape)}, mask {tuple(mask.shape)}"
        )
    m = mask.bool()
    count = int(m.sum())
    if count == 0:
        raise ValueError("mask selects no tokens")
    p = actor_logprobs.detach().double()[m]
    q = rollout_logprobs.detach().double()[m]
    for name, t in (("actor_logprobs", p), ("rollout_logprobs", q)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} has non-finite values on masked-in tokens")
    diff = p - q
    log_r = diff  # log(p/q)
    return {
        "mean_abs_diff": float(diff.abs().mean()),
        "max_abs_diff": float(diff.abs().max()),
        "kl_k1": float((-log_r).mean()),
        "kl_k3": float((torch.expm1(log_r) - log_r).mean()),
        "ppl_ratio": float(torch.exp((-log_r).mean())),
        "tokens": float(count),
    }


# Healthy fresh-sample gaps (mean |log p - log q| per token), with identical weights:
# fp32 engine and fp32 actor on CPU: about 1e-6 (bench/RESULTS.md, "Rollout/actor mismatch");
# bf16 on GPU: about 0.02-0.03 RMS (published trainer-vs-vLLM measurements for a 0.5B
# model; nothing was measured here without a GPU).  Each default leaves two orders of
# magnitude (fp32) or three to five times (bf16) of headroom over those.
FP32_MAX_MISMATCH = 1e-4
LOW_PRECISION_MAX_MISMATCH = 0.1


def max_mismatch_for(max_mismatch: float | None, rollout_dtype: str, actor_dtype: str) -> float:
    """``rollout.max_mismatch``, or its default for the two dtypes when unset."""
    if max_mismatch is not None:
        return float(max_mismatch)
    if rollout_dtype == "float32" and actor_dtype == "float32":
        return FP32_MAX_MISMATCH
    return LOW_PRECISION_MAX_MISMATCH


class RolloutMismatchError(RuntimeError):
    """The engine's log-probs stay far from the actor's: training would go on off-policy."""


LIKELY_CAUSES = (
    "an engine layer that computes with stale weights after the sync (a tied LM head, a "
    "repacked kernel, a parameter the mapping does not send: run with rollout.weight_sync.verify=true); "
    "different sampling on the two sides (rollout.temperature is applied by both; top_p/top_k "
    "change the engine's processed log-probs only when they cut tokens); a different model "
    "config in the engine and the actor (rope, norm epsilon, vocab); or a low-precision engine "
    "whose rounding exceeds rollout.max_mismatch (raise it knowingly)"
)
