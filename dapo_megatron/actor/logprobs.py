"""Per-token log-probs and entropy straight from vocab-parallel logits.

DAPO needs ``log p(label)`` (for the importance ratio) and the entropy ``H`` (logged, and
optionally a bonus) for every response token.  Megatron's output layer emits logits sharded
over the vocabulary (``[..., V/tp]`` per TP rank); gathering them, or running plain
``log_softmax`` + ``gather`` through autograd, costs several ``[tokens x vocab]`` float32
copies (Qwen2.5: 151936 columns -> ~0.6 MB per token per copy).  This module instead:

* never gathers the vocabulary: only per-token statistics (max, sum-exp, sum p*z, target
  logit) cross the TP group -- two all-reduces of ``[tokens]`` / ``[3, tokens]`` in forward,
  none in backward;
* works in float32 internally (bf16 logits in, float32 log-probs out), chunked over tokens so
  the float32 scratch is bounded by ``chunk_elems`` elements, not by ``tokens x vocab``;
* has a hand-written backward that *recomputes* the softmax from the saved logits instead of
  saving it.  Trade-off: one extra ``exp`` pass over the logits in backward, in exchange for
  keeping nothing of size ``[tokens x vocab]`` alive between forward and backward beyond the
  logits themselves (which the caller's graph holds anyway; Megatron's cross-entropy keeps a
  float32 softmax instead, i.e. 2x the bf16 logits).
* excludes padded vocabulary columns (``>= vocab_size``; Megatron pads the embedding to a
  multiple of ``128 * tp`` and their logits are exactly 0, which would otherwise add
  ``padded - vocab`` spurious ``exp(0 - max)`` terms to the partition function).  Padded
  columns are a suffix of the global vocabulary, so on each rank the valid columns are a
  prefix of the shard and we simply slice them; their gradient is 0.

``tp_group=None`` means megatron's tensor-parallel group if megatron's parallel state is
initialised, and "no tensor parallelism" otherwise -- so TP=1 code and tests need no process
group at all.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch.autograd.function import once_differentiable

__all__ = ["vocab_parallel_logprobs_and_entropy", "naive_logprobs_and_entropy", "DEFAULT_CHUNK_ELEMS"]

# float32 scratch per chunk: 2 buffers of this many elements (2**24 -> 2 x 64 MiB).
DEFAULT_CHUNK_ELEMS = 1 << 24


def _resolve_tp(tp_group) -> tuple[object | None, int, int]:
    """(group, rank, world size); group None means no collectives are needed."""
    if tp_group is None:
        if not ps.model_parallel_is_initialized():
            return None, 0, 1
        tp_group = ps.get_tensor_model_parallel_group()
    size = dist.get_world_size(tp_group)
    if size == 1:
        return None, 0, 1
    return tp_group, dist.get_rank(tp_group), size


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for fp32/bf16/fp16 logits; float64 stays float64 (lets gradcheck run exactly)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(n: int, step: int):
    for s in range(0, n, step):
        yield s, min(s + step, n)


class _VocabParallelLogprobEntropy(torch.autograd.Function):
    """Forward: per-token (log p(label), H) in float32.  Backward: recompute softmax per chunk.

    Notation (per token, ``x`` = this rank's valid logit columns, ``T`` = temperature):
    ``z = (x - M) / T`` with ``M`` the global max of ``x`` (so ``z <= 0``, no overflow),
    ``S = sum_global exp(z)``, ``log p = z - log S``, ``H = log S - sum_global(exp(z) z) / S``.
    """

    @staticmethod
    def forward(ctx, logits, labels, temperature, n_valid, vocab_start, group, compute_entropy, chunk_elems):
        n_tok = logits.shape[0]
        x = logits[:, :n_valid]
        dev = logits.device
        acc = _acc_dtype(logits.dtype)
        # max commutes with the float cast and with division by T > 0: no float32 copy needed.
        if n_valid > 0:
            gmax = x.max(dim=-1).values.to(acc)
        else:  # this rank holds only padding columns
            gmax = torch.full((n_tok,), -math.inf, device=dev, dtype=acc)
        if group is not None:
            dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)

        local_label = labels - vocab_start
        owned = (local_label >= 0) & (local_label < n_valid)
        local_label = torch.where(owned, local_label, torch.zeros_like(local_label))

        stats = torch.zeros(3 if compute_entropy else 2, n_tok, device=dev, dtype=acc)
        step = max(1, chunk_elems // max(n_valid, 1))
        if n_valid > 0:
            for s, e in _chunks(n_tok, step):
                z = x[s:e].to(acc, copy=True)
                z.sub_(gmax[s:e, None]).div_(temperature)
                stats[1, s:e] = z.gather(-1, local_label[s:e, None]).squeeze(-1)
                p = torch.exp(z)
                stats[0, s:e] = p.sum(-1)
                if compute_entropy:
                    stats[2, s:e] = p.mul_(z).sum(-1)
                del z, p
        stats[1].mul_(owned)  # only the owning rank contributes the target logit
        if group is not None:
            dist.all_reduce(stats, group=group)

        log_s = stats[0].log()
        log_probs = stats[1] - log_s
        entropy = log_s - stats[2] / stats[0] if compute_entropy else torch.zeros_like(log_s)

        ctx.save_for_backward(logits, gmax, log_s, entropy, local_label, owned)
        ctx.cfg = (temperature, n_valid, compute_entropy, chunk_elems)
        if not compute_entropy:
            ctx.mark_non_differentiable(entropy)
        return log_probs, entropy

    @staticmethod
    @once_differentiable  # the hand-written backward is not itself differentiable
    def backward(ctx, g_lp, g_h):
        logits, gmax, log_s, entropy, local_label, owned = ctx.saved_tensors
        temperature, n_valid, compute_entropy, chunk_elems = ctx.cfg
        n_tok = logits.shape[0]
        grad = torch.empty_like(logits)
        grad[:, n_valid:] = 0
        if n_valid == 0:
            return grad, None, None, None, None, None, None, None
        acc = log_s.dtype
        g_lp = torch.zeros_like(log_s) if g_lp is None else g_lp.to(acc)
        use_h = compute_entropy and g_h is not None
        g_h = g_h.to(acc) if use_h else None
        inv_t = 1.0 / temperature
        step = max(1, chunk_elems // n_valid)
        for s, e in _chunks(n_tok, step):
            # log p = (x - M)/T - log S, recomputed (not saved) -- see module docstring.
            lp = logits[s:e, :n_valid].to(acc, copy=True)
            lp.sub_(gmax[s:e, None]).div_(temperature).sub_(log_s[s:e, None])
            p = torch.exp(lp)
            # d/dz of  g_lp*log p_y + g_h*H  =  g_lp*(onehot - p) - g_h*p*(log p + H)
            #                                 = g_lp*onehot - p*(g_lp + g_h*(log p + H))
            if use_h:
                lp.add_(entropy[s:e, None]).mul_(g_h[s:e, None]).add_(g_lp[s:e, None])
            else:
                lp.copy_(g_lp[s:e, None].expand_as(lp))
            lp.mul_(p).neg_()
            del p
            lp.scatter_add_(-1, local_label[s:e, None], (g_lp[s:e] * owned[s:e])[:, None])
            lp.mul_(inv_t)  # z = x / T
            grad[s:e, :n_valid] = lp
            del lp
        return grad, None, None, None, None, None, None, None


def vocab_parallel_logprobs_and_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    compute_entropy: bool = True,
    tp_group=None,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token ``log softmax(logits / T)[label]`` and entropy of ``softmax(logits / T)``.

    Args:
        logits: this TP rank's contiguous vocabulary shard ``[..., V_padded / tp]`` (any
            leading dims, e.g. Megatron's ``[s, b, v]``); fp32/bf16/fp16.
        labels: global token ids with shape ``logits.shape[:-1]``; must lie in
            ``[0, vocab_size)`` (for ignored positions pass any valid id and mask the loss).
        temperature: sampling temperature; logits are divided by it, as vLLM/verl sample.
        vocab_size: real (unpadded) vocabulary size; global columns ``>= vocab_size`` are
            excluded from the softmax.  Default: no padding.
        compute_entropy: if False, the entropy is neither computed nor returned (None).
        tp_group: tensor-parallel group; None = megatron's TP group when its parallel state is
            initialised, else no TP.  A group of size 1 uses no collectives.
        chunk_elems: float32 scratch budget per chunk (elements); tokens are processed in
            chunks of ``chunk_elems // shard_width``.

    Returns:
        ``(log_probs, entropy)``, float32 (float64 for float64 logits), shaped like ``labels``;
        both differentiable w.r.t. ``logits`` (gradient in the logits' dtype, 0 on padded
        columns).  Under TP every rank returns the same values, and each rank's gradient is its
        shard of the full gradient.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} != logits leading shape {tuple(logits.shape[:-1])}")
    group, rank, world = _resolve_tp(tp_group)
    shard = logits.shape[-1]
    full = shard * world
    vocab_size = full if vocab_size is None else int(vocab_size)
    if not 0 < vocab_size <= full:
        raise ValueError(f"vocab_size={vocab_size} not in (0, {full}] (shard {shard} x tp {world})")
    vocab_start = rank * shard
    n_valid = min(max(vocab_size - vocab_start, 0), shard)
    lp, ent = _VocabParallelLogprobEntropy.apply(
        logits.reshape(-1, shard),
        labels.reshape(-1).long(),
        float(temperature),
        n_valid,
        vocab_start,
        group,
        bool(compute_entropy),
        int(chunk_elems),
    )
    lp = lp.view(labels.shape)
    return lp, (ent.view(labels.shape) if compute_entropy else None)


def naive_logprobs_and_entropy(
    full_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: full-vocab float32 ``log_softmax`` + ``gather`` + entropy, plain autograd.

    Memory-hungry on purpose (several ``[tokens x vocab]`` float32 tensors); used by tests and
    ``bench/logprobs_memory.py`` as the ground truth.
    """
    v = full_logits.shape[-1] if vocab_size is None else vocab_size
    logp = torch.log_softmax(full_logits[..., :v].to(_acc_dtype(full_logits.dtype)) / temperature, dim=-1)
    lp = logp.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return lp, ent
