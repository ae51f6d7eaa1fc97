"""Stream the actor's weights as HF tensors on every rank, across TP and PP.

Within a PP stage, :func:`~dapo_megatron.actor.hf_loading.iter_hf_weights` (with a dtype)
casts each parameter's TP shard to the rollout dtype, all-gathers the shards and converts the
result with the shared mapping (models/), so every rank of the owning stage holds each of its
stage's tensors in full, one at a time.

Across stages (PP > 1), what crosses is decided by the receiver.  Each rank may say which
slice of each HF tensor it needs (``need``: HF name -> :class:`~.slices.TensorSlice`; for a
rollout engine :func:`~.engine_layout.engine_slices`, i.e. vLLM's own TP shard).  The rank of
the owning stage in the receiver's pipeline group (same actor TP/DP rank) slices the full
tensor and sends only that slice, point to point, once per tensor and receiver.  Before this,
every tensor was broadcast in full over the pipeline group: with engine TP = k every receiver
got k times the bytes of each TP-split tensor that its engine keeps.

What a receiver yields: vLLM's loaders take the *full* HF tensor and narrow it themselves
(``ColumnParallelLinear`` / ``QKVParallelLinear`` / ``RowParallelLinear.weight_loader``
narrow by ``tp_rank``; ``VocabParallelEmbedding.weight_loader`` asserts the full vocab size),
and the layerwise reload replays exactly those loaders.  Feeding them pre-sliced tensors
would need ``is_sharded_weight`` on every parameter (not honoured by the vocab loader) --
a second loading path.  So the received slice is placed into a full-shaped tensor that is
NaN elsewhere (:func:`~.slices.nan_placeholder`) and the engine loads it through its one
normal path.  The cost is the receiver's memory: one full-shaped tensor per tensor in flight
(the bucket cap counts full sizes, as before); the gain is the stage-crossing bytes.  A slice
rule that disagreed with the loader would load NaN, which verification names.

Receivers need shapes before the data: each stage describes its tensors up front
(names/shapes computed on ``meta`` tensors through the same mapping, no data moved), and one
``all_gather_object`` over the pipeline group shares these plans together with every rank's
``need``; the slices are validated before any data moves and the verdict is shared over the
model-parallel group, so a bad slice fails every rank at the same point.  Only the owning
stage's data crosses stages, already cast to the rollout dtype.  :class:`StageTraffic`
counts the bytes each rank sends and receives.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from dapo_megatron.actor.hf_loading import iter_hf_weights, layer_offset_of, unwrap_model
from dapo_megatron.models.mapping import get_mapping
from dapo_megatron.weight_sync.slices import WHOLE, TensorSlice, nan_placeholder

__all__ = ["StageTraffic", "iter_actor_hf_weights", "iter_engine_hf_weights", "stage_plan"]


def stage_plan(model: torch.nn.Module, hf_config, tp_size: int) -> list[tuple[str, tuple[int, ...]]]:
    """(hf_name, full shape) of every HF tensor this PP stage yields, in yield order (no data)."""
    mapping = get_mapping(hf_config, tp=tp_size)
    inner = unwrap_model(model)
    offset = layer_offset_of(inner)
    plan: list[tuple[str, tuple[int, ...]]] = []
    for name, param in inner.named_parameters():
        shape = list(param.shape)
        dim = mapping.partition_dim(name)
        if tp_size > 1 and dim is not None:
            shape[dim] *= tp_size
        meta = torch.empty(shape, device="meta", dtype=param.dtype)
        for hf_name, t in mapping.megatron_full_to_hf(name, meta, layer_offset=offset):
            plan.append((hf_name, tuple(t.shape)))
    return plan


def _check_needs(plans: list, needs: list, model_parallel_group) -> None:
    """Validate every receiver's slices against the shapes; a bad one fails the whole TP x PP grid alike.

    Every rank of a pipeline group sees the same plans and needs, but the TP peers of a stage
    (other pipeline groups) do not: the verdict is shared over the model-parallel group so
    that no rank is left waiting in a TP all-gather for a peer that raised.
    """
    problems: list[str] = []
    for stage, plan in enumerate(plans):
        for receiver, wanted in enumerate(needs):
            if receiver == stage or not wanted:
                continue
            for name, shape in plan:
                try:
                    wanted.get(name, WHOLE).check(shape, f"{name} (needed by PP stage {receiver})")
                except ValueError as e:
                    problems.append(str(e))
    verdicts: list = [None] * dist.get_world_size(model_parallel_group)
    dist.all_gather_object(verdicts, problems, group=model_parallel_group)
    found = sorted({p for v in verdicts for p in v})
    if found:
        raise ValueError("weight stream: requested slices outside the tensors: " + "; ".join(found[:10]))


@dataclass
class StageTraffic:
    """Bytes this rank moved across pipeline stages during one walk (PP > 1; zero otherwise)."""

    sent_bytes: int = 0
    received_bytes: int = 0
    received_tensors: int = 0
    sliced_tensors: int = 0  # received tensors of which only a slice was sent


@torch.no_grad()
def iter_actor_hf_weights(
    model: torch.nn.Module,
    hf_config,
    *,
    dtype: torch.dtype | None = None,
    need: Mapping[str, TensorSlice] | None = None,
    traffic: StageTraffic | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full-shaped tensor)`` for the whole model on every rank (collective over TP and PP).

    Every rank of a TP x PP grid must iterate to the end in lockstep.  Tensors are cast
    to ``dtype`` (default: keep the parameter dtype) and are fresh or read-only views:
    consumers must not modify them.

    ``need`` (this rank's; may differ between ranks): for tensors owned by another PP stage,
    only ``need[name]`` is sent here and the yielded tensor holds it, NaN elsewhere; names
    absent from ``need`` arrive whole.  ``None``: every tensor whole (export, tests).  Tensors
    of this rank's own stage are always whole.  ``traffic`` (optional) accumulates the bytes.
    """
    pp_size = ps.get_pipeline_model_parallel_world_size()
    if pp_size == 1:
        yield from iter_hf_weights(model, hf_config, dtype=dtype)
        return

    tp_size = ps.get_tensor_model_parallel_world_size()
    pp_rank = ps.get_pipeline_model_parallel_rank()
    pp_group = ps.get_pipeline_model_parallel_group()
    mine = stage_plan(model, hf_config, tp_size)
    own_names = {name for name, _ in mine}
    # only what other stages will send matters to them; plans and needs travel together
    my_need = None if need is None else {k: v for k, v in need.items() if k not in own_names}
    gathered: list = [None] * pp_size
    dist.all_gather_object(gathered, (mine, my_need), group=pp_group)
    plans = [g[0] for g in gathered]
    needs: list[Mapping[str, TensorSlice] | None] = [g[1] for g in gathered]
    _check_needs(plans, needs, ps.get_model_parallel_group())
    param_dtype = next(unwrap_model(model).parameters()).dtype
    out_dtype = param_dtype if dtype is None else dtype
    device = next(unwrap_model(model).parameters()).device

    def part_for(receiver: int, name: str, shape: tuple[int, ...]) -> TensorSlice:
        wanted = needs[receiver]
        part = WHOLE if wanted is None else wanted.get(name, WHOLE)
        return WHOLE if part.covers(shape) else part

    for stage in range(pp_size):
        if stage == pp_rank:
            produced = iter_hf_weights(model, hf_config, dtype=dtype)
            for k, (want_name, want_shape) in enumerate(plans[stage]):
                name, t = next(produced)
                t = t.contiguous()
                if name != want_name or tuple(t.shape) != want_shape:
                    raise RuntimeError(
                        f"PP stage {stage} tensor {k}: produced {name!r} {tuple(t.shape)} but planned "
                        f"{want_name!r} {want_shape}"
                    )
                pending = []  # (work, piece): the piece must outlive its send
                for receiver in range(pp_size):
                    if receiver == stage:
                        continue
                    piece = part_for(receiver, name, want_shape).of(t).contiguous()
                    pending.append((dist.isend(piece, group=pp_group, group_dst=receiver), piece))
                    if traffic is not None:
                        traffic.sent_bytes += piece.numel() * piece.element_size()
                for work, _piece in pending:
                    work.wait()
                del pending
                yield name, t
            leftover = next(produced, None)
            if leftover is not None:
                raise RuntimeError(f"PP stage {stage} produced unplanned tensor {leftover[0]!r}")
        else:
            for name, shape in plans[stage]:
                part = part_for(pp_rank, name, shape)
                if part.dim is None:
                    t = torch.empty(shape, dtype=out_dtype, device=device)
                    region = t
                else:
                    t = nan_placeholder(shape, out_dtype, device)
                    region = part.of(t)
                buf = region if region.is_contiguous() else torch.empty(region.shape, dtype=out_dtype, device=device)
                dist.recv(buf, group=pp_group, group_src=stage)
                if buf is not region:
                    region.copy_(buf)
                del buf
                if traffic is not None:
                    traffic.received_bytes += region.numel() * region.element_size()
                    traffic.received_tensors += 1
                    traffic.sliced_tensors += part.dim is not None
                yield name, t


def iter_engine_hf_weights(
    model: torch.nn.Module,
    hf_config,
    *,
    dtype: torch.dtype | None = None,
    need: Mapping[str, TensorSlice] | None = None,
    traffic: StageTraffic | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """:func:`iter_actor_hf_weights` plus the tied aliases an engine loads separately (collective).

    For a tied model the embedding is followed by the same tensor under ``lm_head.weight``
    (:meth:`~dapo_megatron.models.mapping.DecoderMapping.tied_aliases`): no second gather and no
    second copy, one more load into the engine.  With PP > 1 the alias arrives as the
    embedding's slice for this rank, so the engine must keep the same slice of both names
    (vLLM shards the LM head exactly like the embedding); a different request is refused.
    """
    aliases = get_mapping(hf_config).tied_aliases()
    by_source: dict[str, list[str]] = {}
    for alias, source in aliases.items():
        if need is not None and need.get(alias, WHOLE) != need.get(source, WHOLE):
            raise ValueError(
                f"tied weight {alias!r} is sent as {source!r}, but this rank's engine keeps slice "
                f"{need.get(alias, WHOLE)} of it and {need.get(source, WHOLE)} of {source!r}"
            )
        by_source.setdefault(source, []).append(alias)
    for name, t in iter_actor_hf_weights(model, hf_config, dtype=dtype, need=need, traffic=traffic):
        yield name, t
        for alias in by_source.get(name, ()):
            yield alias, t
