"""Hugging Face weights <-> this rank's shard of a Megatron GPTModel.

:func:`load_hf_weights_into_model` reads safetensors lazily
(:func:`~dapo_megatron.checkpoint.hf_reader.open_hf_safetensors`: one HF tensor at a
time, only the tensors this rank's parameters need) and fills every parameter of the
model (this PP stage, this TP rank) through :class:`dapo_megatron.models.mapping.DecoderMapping`.

:func:`iter_hf_weights` is the reverse direction, streaming: for one parameter at a
time it all-gathers the TP shards, merges them and yields the HF tensors of this
PP stage (the basis for export and for per-step weight sync).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from dapo_megatron.checkpoint.hf_reader import open_hf_safetensors
from dapo_megatron.models.mapping import get_mapping

__all__ = [
    "load_hf_weights_into_model",
    "iter_hf_weights",
    "unwrap_model",
    "layer_offset_of",
]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / Float16Module-style wrappers (``.module`` chains)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def layer_offset_of(model: torch.nn.Module) -> int:
    """Global index of this PP stage's first transformer layer (0 without layers)."""
    layers = getattr(getattr(model, "decoder", None), "layers", None)
    if layers is None or len(layers) == 0:
        return 0
    return int(layers[0].layer_number) - 1


@torch.no_grad()
def load_hf_weights_into_model(
    model: torch.nn.Module,
    hf_dir_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
    hf_config,
) -> list[str]:
    """Copy HF weights into every parameter of this rank's Megatron model shard.

    Args:
        model: a GPTModel built by :func:`dapo_megatron.actor.model.build_gpt_model`
            (possibly wrapped in DDP/Float16Module).
        hf_dir_or_state_dict: an HF checkpoint directory (safetensors) or a mapping
            from HF names to tensors.
        hf_config: the HF config of the checkpoint.

    Returns:
        The Megatron parameter names that were loaded.

    Raises:
        KeyError: an HF tensor needed by a parameter is missing (names both).
        ValueError: a shape mismatch (names the tensor and both shapes).
    """
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    mapping = get_mapping(hf_config, tp=tp_size)
    inner = unwrap_model(model)
    offset = layer_offset_of(inner)

    if isinstance(hf_dir_or_state_dict, Mapping):
        state = hf_dir_or_state_dict

        def _get(name: str) -> torch.Tensor:
            if name not in state:
                raise KeyError(f"HF state dict has no tensor {name!r}")
            return state[name]

        source = contextlib.nullcontext(_get)
    else:
        source = open_hf_safetensors(hf_dir_or_state_dict)

    loaded: list[str] = []
    with source as get:
        for name, param in inner.named_parameters():
            try:
                shard = mapping.hf_to_megatron_shard(name, get, tp_rank, tp_size, layer_offset=offset)
            except KeyError as e:
                raise KeyError(f"loading Megatron parameter {name!r}: {e.args[0]}") from None
            except ValueError as e:
                raise ValueError(f"loading Megatron parameter {name!r}: {e}") from None
            if tuple(shard.shape) != tuple(param.shape):
                raise ValueError(
                    f"shape mismatch for Megatron parameter {name!r} (from HF "
                    f"{mapping.hf_names_for(name, offset)}): shard {tuple(shard.shape)} vs "
                    f"parameter {tuple(param.shape)} (tp_rank={tp_rank}/{tp_size})"
                )
            pdim = getattr(param, "partition_dim", None)
            if getattr(param, "tensor_model_parallel", False) and tp_size > 1:
                want = mapping.partition_dim(name)
                if pdim != want:
                    raise ValueError(f"{name!r}: model shards dim {pdim}, mapping says {want}")
            param.data.copy_(shard.to(dtype=param.dtype))
            loaded.append(name)
    return loaded


@torch.no_grad()
def iter_hf_weights(
    model: torch.nn.Module, hf_config, *, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full_tensor)`` for every parameter of this PP stage, one at a time.

    Collective over the tensor-parallel group: every TP rank of the stage must iterate
    in lockstep (each gets the same full tensors).  Only one parameter's full tensor is
    materialised at a time.  Vocab padding is removed; a tied output layer is skipped.
    Tensors keep the parameter dtype/device.  Pipeline stages yield disjoint names
    (global layer numbering); gathering across PP is the caller's business.

    ``dtype`` casts each TP shard *before* the all-gather: syncing an fp32 actor into a bf16
    engine then sends half the bytes, and since the cast is elementwise and the merge only
    rearranges, the result equals gather-then-cast.
    """
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    mapping = get_mapping(hf_config, tp=tp_size)
    inner = unwrap_model(model)
    offset = layer_offset_of(inner)
    for name, param in inner.named_parameters():
        shard = param.detach() if dtype is None else param.detach().to(dtype)
        if tp_size > 1 and mapping.partition_dim(name) is not None:
            parts = [torch.empty_like(shard) for _ in range(tp_size)]
            dist.all_gather(parts, shard.contiguous(), group=tp_group)
            full = mapping.merge_tp_shards(name, parts)
            del parts
        else:
            full = shard
        yield from mapping.megatron_full_to_hf(name, full, layer_offset=offset)
        del full, shard
