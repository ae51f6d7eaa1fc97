"""HF safetensors -> torch_dist: every chunk planned from the headers, converted when DCP's writer asks for it.

Why plan from headers: running the mapping on meta tensors gives every chunk's shape and
dtype without reading a weight, so the whole checkpoint is described to DCP up front and
each chunk (one parameter of one layer) is converted from the HF tensors only when the
writer needs its bytes; one converted tensor is in memory at a time.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from megatron.core.dist_checkpointing.mapping import (
    LocalNonpersistentObject,
    ShardedBase,
    ShardedObject,
    ShardedTensor,
)

from dapo_megatron.checkpoint.files import ensure_output_free, staged_output_dir
from dapo_megatron.checkpoint.hf_reader import SAFETENSORS_DTYPES, open_hf_safetensors
from dapo_megatron.checkpoint.hf_writer import copy_hf_assets
from dapo_megatron.checkpoint.manifest import build_manifest, write_manifest
from dapo_megatron.checkpoint.metadata import write_checkpoint_metadata
from dapo_megatron.checkpoint.torch_dist import ChunkSpec, write_torch_dist
from dapo_megatron.conversion.meta_model import (
    is_tensor_entry,
    layer_index,
    meta_sharded_state_dict,
    progress_bar,
    same_shape,
)
from dapo_megatron.conversion.validation import ConversionError, HFCheckpoint, validate_hf_checkpoint
from dapo_megatron.models.mapping import get_mapping

HF_SUBDIR = "hf"  # config.json + tokenizer files kept inside a converted checkpoint
_WEIGHT_DTYPES = {name: dtype for name, dtype in SAFETENSORS_DTYPES.items() if dtype.is_floating_point}


def hf_to_mcore(
    hf_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    tp: int = 1,
    pp: int = 1,
    progress: bool = True,
) -> Path:
    """Convert an HF safetensors checkpoint into a torch_dist checkpoint loadable at any layout.

    Args:
        hf_dir: HF directory (config.json + safetensors, single file or sharded).
        out: output directory (must not exist or be empty); loadable with
            :func:`dapo_megatron.checkpoint.training.load_checkpoint`.
        tp, pp: target layout: validated (divisibility) and used for vocab padding.
        progress: show a tqdm bar.

    Returns:
        ``out``.

    Raises:
        ConversionError: invalid input (nothing is written).
        FileExistsError: ``out`` exists and is not empty.
    """
    ckpt = validate_hf_checkpoint(hf_dir, tp=tp, pp=pp)  # before anything is written
    ensure_output_free(out)
    cfg = ckpt.config
    if ckpt.layout.tie_word_embeddings and "lm_head.weight" in ckpt.tensors:
        with open_hf_safetensors(hf_dir) as get:
            if not torch.equal(get("lm_head.weight"), get("model.embed_tokens.weight")):
                raise ConversionError(
                    f"{hf_dir}: tie_word_embeddings=true in config.json but lm_head.weight differs "
                    "from model.embed_tokens.weight"
                )
    mapping = get_mapping(cfg, tp=tp)  # vocab padded for the target TP
    with staged_output_dir(out) as stage, meta_sharded_state_dict(cfg) as sharded:
        with open_hf_safetensors(hf_dir, reopen=True) as get:  # pages of finished chunks are released
            chunks, objects, common = _write_plan(sharded, mapping, ckpt, get)
            del sharded
            bar = progress_bar(None, desc="hf->mcore", total=len(chunks), enabled=progress)
            write_torch_dist(stage, chunks, objects, common, on_chunk=lambda _spec: bar.update(1))
            bar.close()
        write_checkpoint_metadata(
            stage,
            cfg,
            step=None,
            tp=tp,
            pp=pp,
            has_optimizer=False,
            has_extra_state=False,
            transformer_impl="local",
            manifest=True,
        )
        (stage / HF_SUBDIR).mkdir()
        shutil.copy2(Path(hf_dir) / "config.json", stage / HF_SUBDIR / "config.json")
        copy_hf_assets(hf_dir, stage / HF_SUBDIR)
        write_manifest(stage, build_manifest(stage))  # last: verified like a trainer checkpoint
    return Path(out)


def _meta_hf_getter(ckpt: HFCheckpoint) -> Callable[[str], torch.Tensor]:
    """``get(name)`` returning an empty meta tensor with the shape and dtype of the safetensors header."""

    def get(name: str) -> torch.Tensor:
        info = ckpt.tensors.get(name)
        if info is None:
            raise KeyError(f"HF checkpoint {ckpt.path} has no tensor {name!r}")
        dtype = _WEIGHT_DTYPES.get(info.dtype)
        if dtype is None:
            raise ConversionError(
                f"{ckpt.path / info.file}: tensor {name} has dtype {info.dtype}; "
                f"weights must be one of {sorted(_WEIGHT_DTYPES)}"
            )
        return torch.empty(info.shape, dtype=dtype, device="meta")

    return get


def _write_plan(
    sharded: dict, mapping, ckpt: HFCheckpoint, get: Callable[[str], torch.Tensor]
) -> tuple[list[tuple[ChunkSpec, Callable[[], torch.Tensor]]], dict[str, Any], dict[str, Any]]:
    """Chunks (with lazy producers), ShardedObjects and common state of the converted checkpoint.

    Each parameter of each layer is one chunk: layer ``i`` of a stacked tensor sits at
    offset ``i`` of the prepended layer axis, as megatron stores it.  Shapes and dtypes
    come from running the mapping on meta tensors, and are checked against megatron's
    own description of the parameter (vocab rows excepted: they follow the target TP).
    """
    num_layers = mapping.layout.num_layers
    get_meta = _meta_hf_getter(ckpt)
    chunks: list[tuple[ChunkSpec, Callable[[], torch.Tensor]]] = []
    objects: dict[str, Any] = {}
    common: dict[str, Any] = {}
    for name, entry in sharded.items():
        if isinstance(entry, ShardedObject):
            objects[entry.unique_key] = entry.data
            continue
        if isinstance(entry, LocalNonpersistentObject):
            continue  # megatron does not save these either
        if not is_tensor_entry(entry):
            if isinstance(entry, ShardedBase):
                raise TypeError(f"unexpected sharded entry {type(entry).__name__} for {name}")
            common[name] = entry
            continue
        full = _convert_one(mapping, name, get_meta, stacked=False)
        layer = layer_index(name)
        shape = tuple(full.shape)
        _check_megatron_layout(name, entry, shape, layer, num_layers)
        if layer is None:
            spec = ChunkSpec(entry.key, shape, (0,) * len(shape), shape, full.dtype, label=name)
        else:
            spec = ChunkSpec(
                entry.key, (num_layers, *shape), (layer,) + (0,) * len(shape), (1, *shape), full.dtype, label=name
            )
        chunks.append((spec, functools.partial(_convert_one, mapping, name, get, layer is not None)))
    return chunks, objects, common


def _convert_one(mapping, name: str, get: Callable[[str], torch.Tensor], stacked: bool) -> torch.Tensor:
    try:
        full = mapping.hf_to_megatron_full(name, get)
    except (KeyError, ValueError) as e:
        raise ConversionError(f"converting Megatron tensor {name!r}: {e}") from None
    return full.unsqueeze(0) if stacked else full


def _check_megatron_layout(name: str, entry, shape: tuple[int, ...], layer: int | None, num_layers: int) -> None:
    """Raise if megatron describes the parameter differently from the chunk we are about to write."""
    param = tuple(entry.data.shape)
    ok = same_shape(name, param, shape)
    if isinstance(entry, ShardedTensor):
        lead = () if layer is None else (num_layers,)
        ok = ok and entry.prepend_axis_num == len(lead) and tuple(entry.global_shape[: len(lead)]) == lead
        ok = ok and (layer is None or entry.global_offset[0] == layer)
    if not ok:
        raise RuntimeError(
            f"megatron describes {name} as {entry.key} {param} (global {getattr(entry, 'global_shape', '?')} at "
            f"{getattr(entry, 'global_offset', '?')}); the converter would write {shape} "
            + ("unstacked" if layer is None else f"as layer {layer} of {num_layers}")
        )
