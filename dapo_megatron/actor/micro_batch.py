"""Token-budget micro-batching ("dynamic batch size") for the Megatron actor.

The actor sees sequences (prompt + response token ids) of very different lengths.  Packing a
fixed number of sequences per micro-batch wastes compute on padding and makes memory depend on
the longest sequence; instead micro-batches are formed by a *padded-token* budget: sequences are
sorted by length (longest first) and cut into runs whose ``count * longest`` stays within
``max_tokens``.  Sorting puts similar lengths together, so little padding is left.

Exactness: sequences are right-padded inside a micro-batch.  With causal attention a real token
never attends to a later (padding) position, and position ids restart at 0 for every row, so the
log-probs of real tokens do not depend on which micro-batch a sequence lands in.  Padding
positions are excluded by the response mask; the loss normaliser is global (see
:mod:`dapo_megatron.algo.loss`), so the split never changes the loss or the gradient beyond
float32 summation order.

Pipeline parallelism needs every DP rank to run the same NUMBER of micro-batches per
mini-batch (all ranks of a PP stage step through the same schedule, and DP ranks meet in the
gradient all-reduce).  :func:`equalize_micro_batch_count` reaches a common target by splitting
the largest micro-batches in two; only when a rank has fewer sequences than the target does it
add *empty* micro-batches: a one-row dummy sequence whose response mask is all zero, which
contributes exactly 0 to the loss and gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from dapo_megatron.contract import ActorBatch

__all__ = [
    "MicroBatch",
    "plan_micro_batches",
    "equalize_micro_batch_count",
    "make_micro_batch",
    "scatter_to_input_order",
]


@dataclass
class MicroBatch:
    """One micro-batch in model layout (``[b, L]``, L = its longest sequence).

    ``indices`` are the rows of the source :class:`ActorBatch` (empty for a dummy).
    ``label_mask[i, t]`` marks positions whose *next* token is a response token counted in the
    loss; ``labels[i, t]`` is that next token.  ``response_index[i, t]`` is the response column
    ``j`` the position predicts (0 where unused), so per-token outputs can be scattered back to
    the ``[N, R]`` response layout.
    """

    indices: torch.Tensor
    tokens: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    label_mask: torch.Tensor
    response_index: torch.Tensor
    old_log_probs: torch.Tensor | None
    advantages: torch.Tensor | None

    def to(self, device: torch.device | str) -> MicroBatch:
        """A copy with every tensor except ``indices`` (kept on CPU for scattering) on ``device``."""
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "indices"}
        return dataclasses.replace(
            self, **{k: None if t is None else t.to(device, non_blocking=True) for k, t in moved.items()}
        )


def plan_micro_batches(seq_lengths: Sequence[int] | torch.Tensor, max_tokens: int) -> list[list[int]]:
    """Group row indices into micro-batches of at most ``max_tokens`` padded tokens.

    Longest first; a micro-batch grows while ``rows * longest <= max_tokens``.  Deterministic
    (ties keep input order).  Raises ValueError naming the row if one sequence alone exceeds the
    budget.
    """
    lengths = [int(x) for x in (seq_lengths.tolist() if isinstance(seq_lengths, torch.Tensor) else seq_lengths)]
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    plans: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        if lengths[i] > max_tokens:
            raise ValueError(f"sequence {i} has {lengths[i]} tokens, more than max_tokens_per_micro_batch={max_tokens}")
        if current and (len(current) + 1) * longest > max_tokens:
            plans.append(current)
            current = []
        if not current:
            longest = lengths[i]
        current.append(i)
    if current:
        plans.append(current)
    return plans


def equalize_micro_batch_count(plans: list[list[int]], target: int) -> list[list[int]]:
    """Reach exactly ``target`` micro-batches (>= ``len(plans)``) without exceeding any budget.

    Splitting a micro-batch only lowers its padded size, so the budget still holds.  The largest
    (most rows) micro-batch is split first; when every micro-batch has one row, empty plans
    (``[]`` -> a dummy micro-batch, see module docstring) are appended.
    """
    if target < len(plans):
        raise ValueError(f"target {target} < current number of micro-batches {len(plans)}")
    out = [list(p) for p in plans]
    while len(out) < target:
        k = max(range(len(out)), key=lambda j: len(out[j])) if out else None
        if k is None or len(out[k]) < 2:
            out.append([])
            continue
        p = out.pop(k)
        half = len(p) // 2
        out[k:k] = [p[:half], p[half:]]
    return out


def make_micro_batch(
    batch: ActorBatch, indices: Sequence[int], pad_token_id: int = 0, pad_to_multiple: int = 1
) -> MicroBatch:
    """Model-layout tensors for rows ``indices`` of ``batch`` (a dummy row when empty).

    ``pad_to_multiple`` rounds the width up (sequence parallelism splits the sequence over TP
    ranks, so it must divide evenly); extra columns are padding like any other.
    """
    idx = torch.as_tensor(list(indices), dtype=torch.long)
    r = batch.max_response_length
    if idx.numel() == 0:
        w = -(-2 // pad_to_multiple) * pad_to_multiple
        zeros = torch.zeros((1, w), dtype=torch.long)
        return MicroBatch(
            indices=idx,
            tokens=torch.full((1, w), pad_token_id, dtype=torch.long),
            position_ids=torch.arange(w).unsqueeze(0),
            labels=zeros.clone(),
            label_mask=torch.zeros((1, w), dtype=torch.bool),
            response_index=zeros,
            old_log_probs=None if batch.old_log_probs is None else torch.zeros((1, w)),
            advantages=None if batch.advantages is None else torch.zeros((1, w)),
        )
    lengths = batch.seq_lengths[idx]
    width = -(-int(lengths.max()) // pad_to_multiple) * pad_to_multiple
    b = idx.numel()
    tokens = torch.full((b, width), pad_token_id, dtype=torch.long)
    src = batch.input_ids[idx, : min(width, batch.input_ids.shape[1])]
    tokens[:, : src.shape[1]] = src
    pos = torch.arange(width).unsqueeze(0).expand(b, width)
    tokens = torch.where(pos < lengths.unsqueeze(1), tokens, torch.full_like(tokens, pad_token_id))
    labels = torch.zeros_like(tokens)
    labels[:, :-1] = tokens[:, 1:]
    # position t predicts token t+1, which is response column j = t + 1 - prompt_len
    j = pos + 1 - batch.prompt_lengths[idx].unsqueeze(1)
    valid = (j >= 0) & (j < r) & (pos + 1 < lengths.unsqueeze(1))
    j_clamped = j.clamp(0, r - 1)
    resp_mask = batch.response_mask[idx] != 0
    label_mask = valid & resp_mask.gather(1, j_clamped)
    response_index = torch.where(valid, j_clamped, torch.zeros_like(j_clamped))

    def to_tokens(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        t = t[idx].float()
        if t.dim() == 1:
            return t.unsqueeze(1).expand(b, width).clone()
        return torch.where(valid, t.gather(1, j_clamped), torch.zeros((), dtype=t.dtype))

    return MicroBatch(
        indices=idx,
        tokens=tokens,
        position_ids=pos.contiguous(),
        labels=labels,
        label_mask=label_mask,
        response_index=response_index,
        old_log_probs=to_tokens(batch.old_log_probs),
        advantages=to_tokens(batch.advantages),
    )


def scatter_to_input_order(
    micro_batches: Sequence[MicroBatch], values: Sequence[torch.Tensor], num_sequences: int, max_response_length: int
) -> torch.Tensor:
    """Per-position values ``[b, L]`` of each micro-batch -> ``[N, R]`` in input order.

    Positions outside ``label_mask`` and rows' unused response columns are 0.
    """
    out = torch.zeros((num_sequences, max_response_length), dtype=torch.float32)
    for mb, v in zip(micro_batches, values, strict=True):
        if mb.indices.numel() == 0:
            continue
        if v.shape != mb.tokens.shape:
            raise ValueError(f"values shape {tuple(v.shape)} != micro-batch tokens shape {tuple(mb.tokens.shape)}")
        sel = mb.label_mask.cpu()
        rows = mb.indices.unsqueeze(1).expand(sel.shape)
        out[rows[sel], mb.response_index.cpu()[sel]] = v.detach().cpu()[sel].float()
    return out
