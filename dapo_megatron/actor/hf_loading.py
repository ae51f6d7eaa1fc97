"""Hugging Face weights <-> this rank's shard of a Megatron GPTModel.

:func:`load_hf_weights_into_model` reads safetensors lazily (``safetensors.safe_open``;
one HF tensor at a time, only the tensors this rank's parameters need) and fills
every parameter of the model (this PP stage, this TP rank) through
:class:`dapo_megatron.models.DecoderMapping`.

:func:`iter_hf_weights` is the reverse direction, streaming: for one parameter at a
time it all-gathers the TP shards, merges them and yields the HF tensors of this
PP stage (the basis for export and for per-step weight sync).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from safetensors import safe_open

from dapo_megatron.models import get_mapping

__all__ = [
    "load_hf_weights_into_model",
    "iter_hf_weights",
    "open_hf_safetensors",
    "unwrap_model",
    "layer_offset_of",
]


@contextlib.contextmanager
def open_hf_safetensors(hf_dir: str | os.PathLike, *, reopen: bool = False) -> Iterator:
    """Context manager yielding ``get(name) -> torch.Tensor`` over an HF safetensors checkpoint.

    Handles a single ``model.safetensors`` and sharded checkpoints with
    ``model.safetensors.index.json``.  Tensors are read on demand (CPU).

    ``reopen=True`` opens the tensor's file for each read and closes it right after.  Why:
    safetensors maps the file and serves tensors from the mapping, and an open handle keeps
    every page it has served resident (counted in the process RSS) until it is closed, so a
    pass over a whole checkpoint through one handle ends up holding the whole file.  With
    ``reopen`` a tensor's pages stay only while the tensor lives; the cost is one header
    parse per read.
    """
    hf_dir = os.fspath(hf_dir)
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        single = os.path.join(hf_dir, "model.safetensors")
        if not os.path.exists(single):
            raise FileNotFoundError(
                f"no model.safetensors or model.safetensors.index.json in {hf_dir!r} "
                "(only safetensors checkpoints are supported)"
            )
        files = ["model.safetensors"]
        weight_map = None
    with contextlib.ExitStack() as stack:
        if reopen:
            handles = {}
            if weight_map is None:
                with safe_open(os.path.join(hf_dir, files[0]), framework="pt") as f:
                    weight_map = {k: files[0] for k in f.keys()}
        else:
            handles = {fn: stack.enter_context(safe_open(os.path.join(hf_dir, fn), framework="pt")) for fn in files}
            if weight_map is None:
                weight_map = {k: files[0] for k in handles[files[0]].keys()}

        def get(name: str) -> torch.Tensor:
            fn = weight_map.get(name)
            if fn is None:
                raise KeyError(f"HF checkpoint {hf_dir!r} has no tensor {name!r}")
            if not reopen:
                return handles[fn].get_tensor(name)
            with safe_open(os.path.join(hf_dir, fn), framework="pt") as f:
                return f.get_tensor(name)

        yield get


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
