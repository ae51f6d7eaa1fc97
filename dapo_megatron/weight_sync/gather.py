"""Stream the actor's weights as full HF tensors on every rank, across TP and PP.

Within a PP stage, :func:`iter_stage_hf_weights` (``actor.hf_loading.iter_hf_weights`` with a
dtype) casts each parameter's TP shard to the rollout dtype, all-gathers the shards and
converts the result with the shared mapping (models/).  Across
stages, each stage's tensors are broadcast from that stage over the pipeline group, one
tensor at a time, in global order (stage 0's names, then stage 1's, ...), so every rank
ends up seeing the whole model as a stream but never holds more than one full tensor.

The receivers need shapes before the data: each stage describes its tensors up front
(names/shapes/dtype computed on ``meta`` tensors through the same mapping, no data
moved), and one ``all_gather_object`` over the pipeline group shares these plans.  Only
the owning stage's data crosses stages, once per tensor, already cast to the rollout
dtype (half the bytes in bf16).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

from dapo_megatron.actor.hf_loading import iter_hf_weights, layer_offset_of, unwrap_model
from dapo_megatron.models import get_mapping

__all__ = ["iter_actor_hf_weights", "iter_stage_hf_weights", "stage_plan"]


def iter_stage_hf_weights(
    model: torch.nn.Module, hf_config, *, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """This PP stage's ``(hf_name, full tensor)`` pairs, shards cast to ``dtype`` before the TP gather."""
    return iter_hf_weights(model, hf_config, dtype=dtype)


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


@torch.no_grad()
def iter_actor_hf_weights(
    model: torch.nn.Module, hf_config, *, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full tensor)`` for the whole model on every rank (collective over TP and PP).

    Every rank of a TP x PP grid must iterate to the end in lockstep.  Tensors are cast
    to ``dtype`` (default: keep the parameter dtype) and are fresh or read-only views:
    consumers must not modify them.
    """
    from megatron.core import parallel_state as ps

    pp_size = ps.get_pipeline_model_parallel_world_size()
    if pp_size == 1:
        yield from iter_stage_hf_weights(model, hf_config, dtype=dtype)
        return

    tp_size = ps.get_tensor_model_parallel_world_size()
    pp_rank = ps.get_pipeline_model_parallel_rank()
    pp_group = ps.get_pipeline_model_parallel_group()
    mine = stage_plan(model, hf_config, tp_size)
    plans: list = [None] * pp_size
    dist.all_gather_object(plans, mine, group=pp_group)
    param_dtype = next(unwrap_model(model).parameters()).dtype
    out_dtype = param_dtype if dtype is None else dtype
    device = next(unwrap_model(model).parameters()).device
    for stage in range(pp_size):
        if stage == pp_rank:
            produced = iter_stage_hf_weights(model, hf_config, dtype=dtype)
            for k, (want_name, want_shape) in enumerate(plans[stage]):
                name, t = next(produced)
                t = t.contiguous()
                if name != want_name or tuple(t.shape) != want_shape:
                    raise RuntimeError(
                        f"PP stage {stage} tensor {k}: produced {name!r} {tuple(t.shape)} but planned "
                        f"{want_name!r} {want_shape}"
                    )
                dist.broadcast(t, group=pp_group, group_src=stage)
                yield name, t
            leftover = next(produced, None)
            if leftover is not None:
                raise RuntimeError(f"PP stage {stage} produced unplanned tensor {leftover[0]!r}")
        else:
            for name, shape in plans[stage]:
                t = torch.empty(shape, dtype=out_dtype, device=device)
                dist.broadcast(t, group=pp_group, group_src=stage)
                yield name, t
