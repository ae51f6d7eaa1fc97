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

Its metrics carry verl's ``rollout_corr/*`` names and definitions (token-level TIS) and are
taken over every data-parallel rank's shard: :func:`rollout_corr_partials` reduces one shard to
sums, counts and extremes, which add up (or take their maximum) over ranks, and
:func:`rollout_corr_metrics` turns the combined partials into the metrics. Ours stay under
``rollout_is/*`` (from the same partials, so also over all ranks).
"""

from __future__ import annotations

import math

import torch

from dapo_megatron.distributed import all_max, all_sum

# verl clamps log-ratios at +-20 before exponentiating them for its weights and metrics.
SAFETY_BOUND = 20.0


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


def rollout_corr_partials(
    old_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor, response_mask: torch.Tensor, *, cap: float
) -> tuple[dict[str, float], dict[str, float]]:
    """One shard's (sums, maxima) from which :func:`rollout_corr_metrics` computes every metric.

    Why sums and maxima: every metric is a token- or sequence-weighted mean, an extreme, or a
    function of those, so adding the sums of all shards (and taking the maximum of their maxima,
    minima stored negated) gives exactly the whole batch's value, whatever the shards' sizes.
    Sequences without a response token are left out (verl counts them with weight 0). float64.
    """
    weights = truncated_is_weights(old_log_prob, rollout_log_prob, response_mask, cap=cap)  # as applied
    mask = response_mask.bool()
    seq = mask.any(-1)
    old = old_log_prob.detach().to(torch.float64)
    rollout = rollout_log_prob.detach().to(torch.float64)
    log_ratio = torch.where(mask, old - rollout, torch.zeros_like(old))
    w = torch.exp(log_ratio.clamp(-SAFETY_BOUND, SAFETY_BOUND))  # verl's weight, before truncation
    clamped = w.clamp(1.0 / cap, cap)
    tokens = mask.sum(-1).to(torch.float64)
    per_seq = tokens.clamp(min=1.0)

    def tok(x: torch.Tensor) -> float:
        return float(x[mask].sum())

    def sq(x: torch.Tensor) -> float:
        return float(x[seq].sum())

    seq_w = torch.where(mask, w, 0.0).sum(-1) / per_seq
    mean_old = torch.where(mask, old, 0.0).sum(-1) / per_seq
    mean_rollout = torch.where(mask, rollout, 0.0).sum(-1) / per_seq
    diff = mean_rollout - mean_old
    seq_log_ratio = log_ratio.sum(-1).clamp(-SAFETY_BOUND, SAFETY_BOUND)
    sums = {
        "tokens": float(mask.sum()),
        "w": tok(w),
        "w_sq": tok(w.square()),
        "w_high": tok((w > cap).double()),
        "w_low": tok((w < 1.0 / cap).double()),
        "clamped": tok(clamped),
        "clamped_sq": tok(clamped.square()),
        "kl": tok(rollout - old),
        "k3_kl": tok(torch.exp(log_ratio) - log_ratio - 1.0),
        "applied": tok(weights.to(torch.float64)),
        "applied_capped": tok((weights >= cap).double()),
        "seqs": float(seq.sum()),
        "seq_w": sq(seq_w),
        "seq_w_sq": sq(seq_w.square()),
        "seq_high": sq((seq_w > cap).double()),
        "seq_low": sq((seq_w < 1.0 / cap).double()),
        "training_ppl": sq(torch.exp(-mean_old)),
        "training_log_ppl": sq(-mean_old),
        "rollout_ppl": sq(torch.exp(-mean_rollout)),
        "rollout_log_ppl": sq(-mean_rollout),
        "log_ppl_diff": sq(diff),
        "log_ppl_abs_diff": sq(diff.abs()),
        "ppl_ratio": sq(torch.exp(diff)),
        "chi2_seq": sq(torch.exp(2.0 * seq_log_ratio)),
    }
    empty = torch.tensor([-math.inf], dtype=torch.float64)

    def top(x: torch.Tensor, where: torch.Tensor) -> float:
        return float(torch.cat([x[where].to(torch.float64), empty]).max())

    maxima = {
        "w_max": top(w, mask),
        "neg_w_min": top(-w, mask),
        "neg_applied_min": top(-weights, mask),
        "seq_w_max": top(seq_w, seq),
        "neg_seq_w_min": top(-seq_w, seq),
        "seq_deviation": top((seq_w - 1.0).abs(), seq),
        "log_ppl_diff_max": top(diff, seq),
        "neg_log_ppl_diff_min": top(-diff, seq),
    }
    return sums, maxima


def rollout_corr_metrics(sums: dict[str, float], maxima: dict[str, float], *, cap: float) -> dict[str, float]:
    """verl's ``rollout_corr/*`` (token-level truncated IS) and our ``rollout_is/*`` from partials.

    verl's definitions, over the response tokens (or, ``seq_*`` and the perplexities, over the
    responses) of the whole batch, with ``w = exp(clamp(old - rollout, -20, 20))`` *before* the
    cap ``C``: ``rollout_is_{mean,max,min}``; ``rollout_is_ratio_fraction_{high,low}``, the
    fraction with ``w > C`` / ``w < 1/C``; ``rollout_is_std`` and ``rollout_is_eff_sample_size``
    (``mean(w)^2 / mean(w^2)``) of ``w`` clamped to ``[1/C, C]``; ``rollout_is_seq_*`` of each
    response's mean ``w`` (``std`` with Bessel's correction, ``max_deviation`` = max |mean - 1|);
    and the mismatch diagnostics ``kl`` (mean of rollout - old log-prob), ``k3_kl``,
    ``{training,rollout}_{ppl,log_ppl}`` (mean over responses of each one's perplexity),
    ``log_ppl_diff`` (rollout - training mean log-prob per response) with its ``abs``/``max``/
    ``min``, ``ppl_ratio``, ``chi2_token`` (mean w^2 - 1) and ``chi2_seq``. Exact quotients,
    where verl adds 1e-8 to its denominators.

    Ours, of the weights as applied (``min(w, C)``): ``rollout_is/weight_mean``,
    ``rollout_is/weight_min`` and ``rollout_is/capped_frac`` (fraction at the cap).
    """
    n, s = sums["tokens"], sums["seqs"]
    if n <= 0:
        return {}
    mean_clamped = sums["clamped"] / n
    var = max(sums["clamped_sq"] / n - mean_clamped**2, 0.0)
    seq_var = (sums["seq_w_sq"] - sums["seq_w"] ** 2 / s) / (s - 1) if s > 1 else 0.0
    corr = {
        "rollout_is_mean": sums["w"] / n,
        "rollout_is_max": maxima["w_max"],
        "rollout_is_min": -maxima["neg_w_min"],
        "rollout_is_ratio_fraction_high": sums["w_high"] / n,
        "rollout_is_ratio_fraction_low": sums["w_low"] / n,
        "rollout_is_std": math.sqrt(var) if n > 1 else 0.0,
        "rollout_is_eff_sample_size": mean_clamped**2 / (sums["clamped_sq"] / n),
        "rollout_is_seq_mean": sums["seq_w"] / s,
        "rollout_is_seq_std": math.sqrt(max(seq_var, 0.0)),
        "rollout_is_seq_max": maxima["seq_w_max"],
        "rollout_is_seq_min": -maxima["neg_seq_w_min"],
        "rollout_is_seq_max_deviation": maxima["seq_deviation"],
        "rollout_is_seq_fraction_high": sums["seq_high"] / s,
        "rollout_is_seq_fraction_low": sums["seq_low"] / s,
        "training_ppl": sums["training_ppl"] / s,
        "training_log_ppl": sums["training_log_ppl"] / s,
        "kl": sums["kl"] / n,
        "k3_kl": sums["k3_kl"] / n,
        "rollout_ppl": sums["rollout_ppl"] / s,
        "rollout_log_ppl": sums["rollout_log_ppl"] / s,
        "log_ppl_diff": sums["log_ppl_diff"] / s,
        "log_ppl_abs_diff": sums["log_ppl_abs_diff"] / s,
        "log_ppl_diff_max": maxima["log_ppl_diff_max"],
        "log_ppl_diff_min": -maxima["neg_log_ppl_diff_min"],
        "ppl_ratio": sums["ppl_ratio"] / s,
        "chi2_token": sums["w_sq"] / n - 1.0,
        "chi2_seq": sums["chi2_seq"] / s - 1.0,
    }
    out = {f"rollout_corr/{k}": float(v) for k, v in corr.items()}
    out["rollout_is/weight_mean"] = sums["applied"] / n
    out["rollout_is/weight_min"] = -maxima["neg_applied_min"]
    out["rollout_is/capped_frac"] = sums["applied_capped"] / n
    return out


def rollout_corr_metrics_over_ranks(
    old_log_prob: torch.Tensor,
    rollout_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    cap: float,
    group=None,
) -> dict[str, float]:
    """:func:`rollout_corr_metrics` of every rank's shard together (collective over ``group``).

    Over the world by default: ranks that hold the same data-parallel shard (tensor and pipeline
    peers) add it as often as each other, which scales every sum and count alike and leaves
    means, fractions and extremes as they are.
    """
    sums, maxima = rollout_corr_partials(old_log_prob, rollout_log_prob, response_mask, cap=cap)
    sum_keys, max_keys = sorted(sums), sorted(maxima)
    total = dict(zip(sum_keys, all_sum([sums[k] for k in sum_keys], group=group), strict=True))
    top = dict(zip(max_keys, all_max([maxima[k] for k in max_keys], group=group), strict=True))
    return rollout_corr_metrics(total, top, cap=cap)
