"""DAPO policy-gradient loss: decoupled clip, dual clip and exact loss aggregation.

The actor splits one mini-batch over data-parallel ranks and micro-batches, and
back-propagates each micro-batch separately. DAPO's token-level loss is a mean
over *every* valid token of the whole mini-batch; normalising each micro-batch
by its own token count instead (what the 52 % verl reproduction did) weights
tokens of short micro-batches more. So every aggregation mode here accepts an
external normaliser: when the actor passes the all-reduced global count, each
micro-batch returns ``local_sum / global_count`` and the contributions of all
micro-batches on all ranks *sum* (gradients accumulate, DP all-reduce sums) to
the exact global mean. Without the normaliser the function falls back to this
batch's own count, which is right for a single, unsplit batch.
"""

from __future__ import annotations

import torch

from dapo_megatron.algo import LOSS_AGG_MODES

# exp(20) ~ 4.9e8: large enough never to bind for sane policies, small enough
# that a stale or corrupted log-prob cannot overflow the ratio to inf.
LOG_RATIO_CLAMP = 20.0

Count = int | float | torch.Tensor


def _as_bool_mask(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over positions where ``mask`` is set.

    ``torch.where`` rather than ``x * mask``: padding positions may hold inf or
    NaN (e.g. log-probs of pad tokens), and ``nan * 0`` would poison the sum and
    its gradient. The graph to ``x`` stays intact even when nothing is selected.
    """
    selected = torch.where(_as_bool_mask(mask), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return selected.sum() if dim is None else selected.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over masked positions; 0 (not NaN) where nothing is masked in.

    An empty selection is normal here (a micro-batch whose responses were all
    filtered as overlong), and a NaN metric or loss would take down the run.
    """
    bool_mask = _as_bool_mask(mask)
    count = bool_mask.sum() if dim is None else bool_mask.sum(dim=dim)
    return masked_sum(x, bool_mask, dim) / count.clamp_min(1).to(x.dtype)


def _check_count(name: str, value: Count) -> Count:
    """Reject a negative normaliser; clamp a zero one to 1.

    A zero global count means no rank has a valid token/sequence, so every local
    sum is 0 too and 0/1 = 0 keeps the graph alive without producing NaN.
    Tensor counts (straight from an all-reduce) are only clamped: checking their
    sign would force a host-device sync on every micro-batch.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(value.shape)}")
        return value.clamp_min(1)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return max(value, 1)


def _check_mode(loss_agg_mode: str) -> None:
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode {loss_agg_mode!r}; valid modes: {', '.join(LOSS_AGG_MODES)}")


def local_normalizer(response_mask: torch.Tensor, loss_agg_mode: str) -> torch.Tensor:
    """The count this batch contributes to the global normaliser of ``loss_agg_mode``.

    The actor sums this over all micro-batches and DP ranks of a mini-batch and
    passes the total as ``global_num_tokens`` ("token-mean") or
    ``global_num_seqs`` (the seq-mean modes). Keeping the counting rule next to
    the aggregation guarantees the global and local denominators count the same
    thing: valid tokens; non-empty sequences for the two seq-mean modes (an empty
    sequence has no token mean and must not dilute the mean); all sequences for
    "seq-mean-token-sum-norm" (Dr.GRPO wants a constant denominator).
    Returns an int64 scalar tensor on the mask's device, ready to all-reduce.
    """
    _check_mode(loss_agg_mode)
    bool_mask = _as_bool_mask(response_mask)
    if loss_agg_mode == "token-mean":
        return bool_mask.sum()
    if loss_agg_mode == "seq-mean-token-sum-norm":
        return torch.tensor(bool_mask.shape[0], dtype=torch.int64, device=bool_mask.device)
    return bool_mask.any(dim=-1).sum()


def aggregate_loss(
    per_token_loss: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str,
    *,
    global_num_tokens: Count | None = None,
    global_num_seqs: Count | None = None,
    max_response_length: int | None = None,
) -> torch.Tensor:
    """Reduce a [B, T] per-token loss to the scalar this batch contributes.

    With ``global_num_tokens`` / ``global_num_seqs`` set to the totals of the
    whole mini-batch (see :func:`local_normalizer`), the returned values of all
    micro-batches on all ranks sum to the exact mini-batch loss, because every
    mode is ``sum over units / global number of units``:

    * "token-mean": sum of masked token losses / tokens.
    * "seq-mean-token-sum": sum of per-sequence token sums / non-empty sequences.
    * "seq-mean-token-mean": sum of per-sequence token means / non-empty sequences.
    * "seq-mean-token-sum-norm": sum of masked token losses /
      (sequences * max_response_length); ``max_response_length`` defaults to
      ``T`` and should be the configured maximum when micro-batches are padded to
      different lengths, so the denominator stays constant.

    An all-empty mask returns 0 with the graph to ``per_token_loss`` intact, so
    ``backward()`` works on every rank even when one has nothing to learn from.
    """
    _check_mode(loss_agg_mode)
    if per_token_loss.shape != response_mask.shape or per_token_loss.dim() != 2:
        raise ValueError(
            "per_token_loss and response_mask must both be [B, T]; got "
            f"{tuple(per_token_loss.shape)} and {tuple(response_mask.shape)}"
        )
    mask = _as_bool_mask(response_mask)

    if loss_agg_mode == "token-mean":
        denom = local_normalizer(mask, loss_agg_mode) if global_num_tokens is None else global_num_tokens
        return masked_sum(per_token_loss, mask) / _check_count("global_num_tokens", denom)

    if loss_agg_mode == "seq-mean-token-sum-norm":
        num_seqs = mask.shape[0] if global_num_seqs is None else global_num_seqs
        length = mask.shape[-1] if max_response_length is None else max_response_length
        if length <= 0:
            raise ValueError(f"max_response_length must be > 0, got {length}")
        denom = _check_count("global_num_seqs", num_seqs) * length
        return masked_sum(per_token_loss, mask) / denom

    seq_values = masked_sum(per_token_loss, mask, dim=-1)
    if loss_agg_mode == "seq-mean-token-mean":
        seq_values = seq_values / mask.sum(dim=-1).clamp_min(1).to(seq_values.dtype)
    denom = local_normalizer(mask, loss_agg_mode) if global_num_seqs is None else global_num_seqs
    # Empty sequences already contribute exactly 0 to the sum.
    return seq_values.sum() / _check_count("global_num_seqs", denom)


def _validate_clip(clip_ratio_low: float, clip_ratio_high: float, clip_ratio_c: float | None) -> None:
    if not 0.0 <= clip_ratio_low < 1.0:
        raise ValueError(f"clip_ratio_low must be in [0, 1), got {clip_ratio_low}")
    if clip_ratio_high < 0.0:
        raise ValueError(f"clip_ratio_high must be >= 0, got {clip_ratio_high}")
    if clip_ratio_c is not None and not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (dual-clip lower bound), got {clip_ratio_c}")


def policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.28,
    clip_ratio_c: float | None = 10.0,
    loss_agg_mode: str = "token-mean",
    global_num_tokens: Count | None = None,
    global_num_seqs: Count | None = None,
    max_response_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """DAPO's clipped surrogate, aggregated for this (micro-)batch.

    Clip-higher (``clip_ratio_high > clip_ratio_low``) leaves more room to raise
    the probability of unlikely good tokens, which is what keeps entropy from
    collapsing. The dual clip bounds the loss of a negative-advantage token at
    ``-A * c``: without it a token whose ratio exploded (a stale sample) would
    contribute an unbounded push-down gradient.

    Returns "pg_loss" (see :func:`aggregate_loss` for the global normalisers)
    and the detached metrics "pg_clipfrac", "pg_clipfrac_lower" and "ppo_kl",
    which are plain masked means over this batch. ``max_response_length`` only
    matters for "seq-mean-token-sum-norm".
    """
    _validate_clip(clip_ratio_low, clip_ratio_high, clip_ratio_c)
    if old_log_prob.shape != log_prob.shape or response_mask.shape != log_prob.shape:
        raise ValueError(
            "log_prob, old_log_prob and response_mask must share one [B, T] shape; got "
            f"{tuple(log_prob.shape)}, {tuple(old_log_prob.shape)}, {tuple(response_mask.shape)}"
        )
    if advantages.dim() == 1:
        if advantages.shape[0] != log_prob.shape[0]:
            raise ValueError(f"advantages [B] has {advantages.shape[0]} rows, log_prob has {log_prob.shape[0]}")
        advantages = advantages.unsqueeze(-1)
    elif advantages.shape != log_prob.shape:
        raise ValueError(f"advantages must be [B] or [B, T] = {tuple(log_prob.shape)}, got {tuple(advantages.shape)}")
    mask = _as_bool_mask(response_mask)

    # Zeroing padding positions up front keeps NaN/inf pad values out of the
    # backward pass (a NaN reached through the unselected branch of a later
    # torch.where would still turn its zero gradient into NaN).
    zero = torch.zeros((), dtype=log_prob.dtype, device=log_prob.device)
    advantages = torch.where(mask, advantages.to(log_prob.dtype), zero)
    # Clamped once, for the ratio and the ppo_kl metric alike, as verl does: otherwise the
    # metric would differ from verl's on exactly the tokens where the policies disagree most.
    log_ratio = torch.where(mask, log_prob - old_log_prob, zero).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)

    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    loss_ppo = torch.maximum(loss_unclipped, loss_clipped)
    clipped = loss_clipped > loss_unclipped

    if clip_ratio_c is not None:
        loss_dual = -advantages * clip_ratio_c
        negative = advantages < 0
        per_token = torch.where(negative, torch.minimum(loss_dual, loss_ppo), loss_ppo)
        clipped_lower = (loss_ppo > loss_dual) & negative
    else:
        per_token = loss_ppo
        clipped_lower = torch.zeros_like(mask)

    pg_loss = aggregate_loss(
        per_token,
        mask,
        loss_agg_mode,
        global_num_tokens=global_num_tokens,
        global_num_seqs=global_num_seqs,
        max_response_length=max_response_length,
    )
    with torch.no_grad():
        metrics = {
            "pg_clipfrac": masked_mean(clipped.to(log_prob.dtype), mask),
            "pg_clipfrac_lower": masked_mean(clipped_lower.to(log_prob.dtype), mask),
            "ppo_kl": masked_mean(-log_ratio, mask),
        }
    return {"pg_loss": pg_loss, **metrics}
