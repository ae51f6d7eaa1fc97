"""torch_dist -> HF safetensors: one parameter of one layer read and written at a time.

Why region reads: :class:`~dapo_megatron.checkpoint.torch_dist.TorchDistReader` reads one
layer of a stacked tensor whatever chunking the saving layout used, and whichever
megatron-core release wrote it, and the planned
:class:`~dapo_megatron.checkpoint.hf_writer.ShardedSafetensorsWriter` puts its bytes
straight into their place in the shard, so memory holds one parameter, never a shard.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import torch
from transformers import CONFIG_MAPPING

from dapo_megatron.checkpoint.files import ensure_output_free, staged_output_dir
from dapo_megatron.checkpoint.hf_writer import (
    ShardedSafetensorsWriter,
    copy_hf_assets,
    dtype_nbytes,
    parse_size,
    plan_shards,
)
from dapo_megatron.checkpoint.layout import resolve_checkpoint_dir
from dapo_megatron.checkpoint.metadata import check_compatible, read_checkpoint_metadata
from dapo_megatron.checkpoint.torch_dist import Region, TorchDistReader
from dapo_megatron.conversion.hf_to_mcore import HF_SUBDIR
from dapo_megatron.conversion.meta_model import (
    is_tensor_entry,
    layer_index,
    meta_sharded_state_dict,
    progress_bar,
    same_shape,
)
from dapo_megatron.conversion.validation import ConversionError, load_hf_config
from dapo_megatron.dtypes import DTYPES
from dapo_megatron.models import get_layout, read_rope_theta
from dapo_megatron.models.mapping import get_mapping
from dapo_megatron.torch_dtypes import torch_dtype


def config_from_metadata(meta: dict):
    """The transformers config stored in a checkpoint's ``dapo_checkpoint.json``."""
    cfg = dict(meta["hf_config"])
    model_type = cfg.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ConversionError(f"checkpoint config has unknown model_type {model_type!r}")
    return CONFIG_MAPPING[model_type].from_dict(cfg)


def _check_config_matches(meta: dict, hf_config, source: str) -> None:
    check_compatible(meta, hf_config, where=f"checkpoint (vs {source})")
    saved = config_from_metadata(meta)
    diffs = []
    if read_rope_theta(saved) != read_rope_theta(hf_config):
        diffs.append(f"rope_theta: checkpoint {read_rope_theta(saved)}, {source} {read_rope_theta(hf_config)}")
    if not math.isclose(float(saved.rms_norm_eps), float(hf_config.rms_norm_eps), rel_tol=0, abs_tol=0):
        diffs.append(f"rms_norm_eps: checkpoint {saved.rms_norm_eps}, {source} {hf_config.rms_norm_eps}")
    if diffs:
        raise ConversionError(f"config of {source} does not match the checkpoint: " + "; ".join(diffs))


def mcore_to_hf(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    *,
    hf_config_from: str | os.PathLike | None = None,
    max_shard_size: str | int = "5GB",
    dtype: str | None = None,
    progress: bool = True,
) -> Path:
    """Export a torch_dist checkpoint (any saved layout) as an HF safetensors directory.

    Args:
        ckpt: a checkpoint directory or a root with ``latest``.
        out: output directory (must not exist or be empty).
        hf_config_from: HF directory whose config.json / tokenizer / generation config
            are copied (its config must describe the same model); default: the config
            stored in the checkpoint and the assets kept by ``hf-to-mcore``.
        max_shard_size: shard limit (e.g. ``"5GB"``); more than one shard adds
            ``model.safetensors.index.json``.
        dtype: cast tensors to ``float32``/``bfloat16``/``float16`` (default: as stored).
        progress: show a tqdm bar.

    Raises:
        ConversionError, CheckpointMismatchError: invalid input (nothing is written).
    """
    try:
        directory = resolve_checkpoint_dir(ckpt)
    except FileNotFoundError as e:
        raise ConversionError(str(e)) from None
    if not (directory / "metadata.json").is_file():
        raise ConversionError(f"{directory} is not a megatron dist checkpoint (no metadata.json)")
    meta = read_checkpoint_metadata(directory)
    if meta.get("transformer_impl", "local") != "local":
        raise ConversionError(
            f"{directory} was written by a {meta['transformer_impl']} model: the converter reads the local "
            "layer spec's keys (input_layernorm.weight, not linear_qkv.layer_norm_weight), so only checkpoints "
            "of actor.transformer_impl=local runs can be exported"
        )
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r} is not one of {sorted(DTYPES)}")
    max_bytes = parse_size(max_shard_size)
    if hf_config_from is not None:
        cfg = load_hf_config(hf_config_from)
        _check_config_matches(meta, cfg, str(hf_config_from))
        asset_dir = Path(hf_config_from)
    else:
        cfg = config_from_metadata(meta)
        asset_dir = directory / HF_SUBDIR
    ensure_output_free(out)
    layout = get_layout(cfg, tp=1)
    mapping = get_mapping(cfg, tp=1)
    try:
        reader = TorchDistReader(directory)
    except FileNotFoundError as e:
        raise ConversionError(str(e)) from None
    stored = reader.tensors
    hf_shapes = layout.hf_shapes()

    with staged_output_dir(out) as stage, meta_sharded_state_dict(cfg) as sharded:
        names = [k for k, v in sharded.items() if is_tensor_entry(v)]
        missing = sorted({sharded[k].key for k in names} - set(stored))
        if missing:
            raise ConversionError(f"checkpoint {directory} lacks tensors the model needs: {', '.join(missing[:5])}")

        def out_dtype(name: str) -> torch.dtype:
            return torch_dtype(dtype) if dtype else stored[sharded[name].key].properties.dtype

        order: list[tuple[str, int]] = []
        specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for name in names:
            for hf_name in mapping.hf_names_for(name) if not _tied_output(name, layout) else []:
                shape = hf_shapes[hf_name]
                specs[hf_name] = (shape, out_dtype(name))
                order.append((hf_name, math.prod(shape) * dtype_nbytes(out_dtype(name))))
        writer = ShardedSafetensorsWriter(stage, plan_shards(order, max_bytes), specs)
        bar = progress_bar(names, desc="mcore->hf", total=len(names), enabled=progress)
        try:
            for name in bar:  # one parameter (of one layer) in memory at a time
                _export_one(reader, name, sharded[name], stored[sharded[name].key], mapping, writer, out_dtype(name))
        finally:
            writer.close()
        writer.finish()
        if (asset_dir / "config.json").is_file():
            shutil.copy2(asset_dir / "config.json", stage / "config.json")
        else:
            cfg.to_json_file(str(stage / "config.json"))
        if asset_dir.is_dir():
            copy_hf_assets(asset_dir, stage)
    return Path(out)


def _export_one(
    reader: TorchDistReader, name: str, entry, stored, mapping, writer: ShardedSafetensorsWriter, dtype: torch.dtype
) -> None:
    """Read one parameter (of one layer) and write its HF tensors; nothing outlives the call."""
    region, stacked = _region(name, entry, stored)
    try:
        (full,) = reader.read([region])
    except (KeyError, ValueError) as e:
        raise ConversionError(f"reading {name} from {reader.directory}: {e}") from None
    for hf_name, t in mapping.megatron_full_to_hf(name, full[0] if stacked else full):
        writer.add(hf_name, t.to(dtype))


def _region(name: str, entry, stored) -> tuple[Region, bool]:
    """The stored region holding this (TP=1) parameter, and whether it is a layer of a stacked tensor.

    Megatron stores the layers of a stage stacked along a prepended axis; reading the
    region ``[i : i + 1]`` of that axis reads one layer, whatever chunking the saving
    layout used.  The stored global fc1 is already ``[gate; up]``.  Vocab tensors are
    read at their stored (padded) size.
    """
    param_shape = tuple(entry.data.shape)
    global_shape = tuple(stored.size)
    if len(global_shape) == len(param_shape) + 1:
        layer = layer_index(name)
        if layer is None or global_shape[1:] != param_shape:
            raise ConversionError(f"stored {entry.key} has shape {global_shape}, model expects [L, *{param_shape}]")
        return Region(entry.key, (layer,) + (0,) * len(param_shape), (1, *param_shape)), True
    if not same_shape(name, global_shape, param_shape):
        raise ConversionError(f"stored {entry.key} has shape {global_shape}, model expects {param_shape}")
    return Region(entry.key, (0,) * len(global_shape), global_shape), False


def _tied_output(name: str, layout) -> bool:
    return name == "output_layer.weight" and layout.tie_word_embeddings
