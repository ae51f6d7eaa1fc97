"""HF <-> Megatron (torch_dist) checkpoint conversion CLI.

::

    python -m dapo_megatron.convert hf-to-mcore --hf-dir HF --out DIR --tp 2 --pp 2
    python -m dapo_megatron.convert mcore-to-hf --ckpt DIR --out HF [--hf-config-from HF] [--max-shard-size 5GB]

(also installed as ``dapo-convert``).

Why one process whatever ``--tp``/``--pp``: a torch_dist checkpoint stores *global*
tensors and megatron reshards on load, so the checkpoint of a TP=N x PP=M model is
the same set of global tensors as that of a TP=1 model -- except the vocabulary
padding (a multiple of ``128 * N``), which we reproduce for the target ``N``.  The
converter therefore builds the TP=1/PP=1 model on the *meta* device (no memory) and
takes megatron's own ``sharded_state_dict`` of it, so keys, stacked-layer axes and
``_extra_state`` objects are exactly what a real model asks for on load.
``--tp``/``--pp`` validate divisibility and set the padding.  Conversion never touches a
GPU, whatever the host has: a gloo group, a CPU-initialised local-spec model on meta.  The
keys are those of megatron's local layer spec; a Transformer-Engine model names the two
pre-norms ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight`` instead.

Both directions stream (:mod:`dapo_megatron.convert_dcp`): ``hf-to-mcore`` plans every
chunk (one parameter of one layer) from the safetensors headers, running the mapping on
meta tensors for shapes and dtypes, and converts each chunk from the HF tensors only when
torch DCP's writer asks for it; ``mcore-to-hf`` reads one parameter of one layer at a
time and writes its bytes straight into their planned place in the safetensors shard.
Peak memory is a few times the largest tensor (``bench/convert_memory.py``), and the
export reads checkpoints written by megatron-core 0.16 and 0.19 alike.

Every input is validated before anything is written (:mod:`dapo_megatron.convert_validation`)
and output appears atomically (:func:`dapo_megatron.convert_io.staged_output_dir`).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dapo_megatron.convert_dcp import ChunkSpec, Region, TorchDistReader, write_torch_dist
from dapo_megatron.convert_io import (
    ShardedSafetensorsWriter,
    copy_hf_assets,
    dtype_nbytes,
    ensure_output_free,
    parse_size,
    plan_shards,
    staged_output_dir,
)
from dapo_megatron.convert_validation import (
    ConversionError,
    HFCheckpoint,
    load_hf_config,
    validate_hf_checkpoint,
)
from dapo_megatron.dtypes import DTYPES, torch_dtype

__all__ = ["hf_to_mcore", "mcore_to_hf", "config_from_metadata", "main"]

HF_SUBDIR = "hf"  # config.json + tokenizer files kept inside a converted checkpoint
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.")


# ----------------------------------------------------------------------------- helpers
def _progress(iterable, *, desc: str, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit="tensor", disable=not enabled, file=sys.stderr)


class _SingleProcessGroup:
    """A 1-rank gloo world with megatron's parallel state at TP=PP=1, torn down on exit.

    ``cpu_only``: on a GPU host too, no CUDA device is selected and no NCCL communicator made.
    """

    def __enter__(self):
        import torch.distributed as dist

        from dapo_megatron.actor.parallel import init_parallel

        if dist.is_initialized() and dist.get_world_size() > 1:
            raise RuntimeError(
                "conversion runs in a single process; call it outside torchrun "
                f"(found a world of {dist.get_world_size()} ranks)"
            )
        init_parallel(1, 1, seed=0, cpu_only=True)
        return self

    def __exit__(self, *exc):
        from dapo_megatron.actor.parallel import destroy_parallel

        destroy_parallel()
        return False


def _meta_sharded_state_dict(hf_config) -> dict:
    """Megatron's sharded state dict of the full (TP=1, PP=1) model, built on the meta device.

    ``cpu_init`` keeps megatron's layers from allocating on the current CUDA device (an explicit
    ``device=`` beats the meta context) and ``perform_initialization=False`` from drawing on the
    CUDA RNG tracker: conversion never touches a GPU, whatever the host has.
    """
    from dapo_megatron.actor.model import build_gpt_model

    with torch.device("meta"):
        model = build_gpt_model(
            hf_config, tp=1, pp=1, pre_process=True, post_process=True, cpu_init=True, perform_initialization=False
        )
    return model.sharded_state_dict()


def _is_tensor_entry(entry) -> bool:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    return isinstance(entry, (ShardedTensor, ShardedTensorFactory))


def config_from_metadata(meta: dict):
    """The transformers config stored in a checkpoint's ``dapo_checkpoint.json``."""
    from transformers import CONFIG_MAPPING

    cfg = dict(meta["hf_config"])
    model_type = cfg.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ConversionError(f"checkpoint config has unknown model_type {model_type!r}")
    return CONFIG_MAPPING[model_type].from_dict(cfg)


# ----------------------------------------------------------------------------- HF -> mcore
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
            :func:`dapo_megatron.actor.checkpoint.load_checkpoint`.
        tp, pp: target layout: validated (divisibility) and used for vocab padding.
        progress: show a tqdm bar.

    Returns:
        ``out``.

    Raises:
        ConversionError: invalid input (nothing is written).
        FileExistsError: ``out`` exists and is not empty.
    """
    from dapo_megatron.actor.checkpoint import write_checkpoint_metadata
    from dapo_megatron.actor.checkpoint_manifest import build_manifest, write_manifest
    from dapo_megatron.actor.hf_loading import open_hf_safetensors
    from dapo_megatron.models import get_mapping

    ckpt = validate_hf_checkpoint(hf_dir, tp=tp, pp=pp)  # before the (slow) megatron import
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
    with staged_output_dir(out) as stage, _SingleProcessGroup():
        sharded = _meta_sharded_state_dict(cfg)
        with open_hf_safetensors(hf_dir, reopen=True) as get:  # pages of finished chunks are released
            chunks, objects, common = _write_plan(sharded, mapping, ckpt, get)
            del sharded
            bar = _progress(None, desc="hf->mcore", total=len(chunks), enabled=progress)
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
        dtype = _SAFETENSORS_DTYPES.get(info.dtype)
        if dtype is None:
            raise ConversionError(
                f"{ckpt.path / info.file}: tensor {name} has dtype {info.dtype}; "
                f"weights must be one of {sorted(_SAFETENSORS_DTYPES)}"
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
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase, ShardedObject

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
        if not _is_tensor_entry(entry):
            if isinstance(entry, ShardedBase):
                raise TypeError(f"unexpected sharded entry {type(entry).__name__} for {name}")
            common[name] = entry
            continue
        try:
            full = mapping.hf_to_megatron_full(name, get_meta)
        except (KeyError, ValueError) as e:
            raise ConversionError(f"converting Megatron tensor {name!r}: {e}") from None
        m = _LAYER_RE.match(name)
        layer = int(m.group(1)) if m else None
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
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    vocab = name in ("embedding.word_embeddings.weight", "output_layer.weight")
    param = tuple(entry.data.shape)
    ok = param == shape or (vocab and param[1:] == shape[1:])
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


# ----------------------------------------------------------------------------- mcore -> HF
def _check_config_matches(meta: dict, hf_config, source: str) -> None:
    from dapo_megatron.actor.checkpoint import check_compatible
    from dapo_megatron.models import read_rope_theta

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
    from dapo_megatron.actor.checkpoint import read_checkpoint_metadata, resolve_checkpoint_dir
    from dapo_megatron.models import get_layout, get_mapping

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

    with staged_output_dir(out) as stage, _SingleProcessGroup():
        sharded = _meta_sharded_state_dict(cfg)
        names = [k for k, v in sharded.items() if _is_tensor_entry(v)]
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
        bar = _progress(names, desc="mcore->hf", total=len(names), enabled=progress)
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
        m = _LAYER_RE.match(name)
        if m is None or global_shape[1:] != param_shape:
            raise ConversionError(f"stored {entry.key} has shape {global_shape}, model expects [L, *{param_shape}]")
        return Region(entry.key, (int(m.group(1)),) + (0,) * len(param_shape), (1, *param_shape)), True
    vocab = name in ("embedding.word_embeddings.weight", "output_layer.weight")
    if global_shape != param_shape and not (vocab and global_shape[1:] == param_shape[1:]):
        raise ConversionError(f"stored {entry.key} has shape {global_shape}, model expects {param_shape}")
    return Region(entry.key, (0,) * len(global_shape), global_shape), False


def _tied_output(name: str, layout) -> bool:
    return name == "output_layer.weight" and layout.tie_word_embeddings


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dapo-convert", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF safetensors -> torch_dist checkpoint")
    a.add_argument("--hf-dir", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--tp", type=int, default=1, help="target tensor-parallel size (validation + vocab padding)")
    a.add_argument("--pp", type=int, default=1, help="target pipeline-parallel size (validation)")
    a.add_argument("--no-progress", action="store_true")
    b = sub.add_parser("mcore-to-hf", help="torch_dist checkpoint -> HF safetensors")
    b.add_argument("--ckpt", required=True, help="checkpoint directory, or a root with 'latest'")
    b.add_argument("--out", required=True)
    b.add_argument("--hf-config-from", default=None, help="HF dir to take config.json and tokenizer files from")
    b.add_argument("--max-shard-size", default="5GB")
    b.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    b.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns 0 on success, 2 on invalid input (message on stderr)."""
    from dapo_megatron.actor.checkpoint import CheckpointMismatchError

    args = build_parser().parse_args(argv)
    try:
        if args.command == "hf-to-mcore":
            path = hf_to_mcore(args.hf_dir, args.out, tp=args.tp, pp=args.pp, progress=not args.no_progress)
        else:
            path = mcore_to_hf(
                args.ckpt,
                args.out,
                hf_config_from=args.hf_config_from,
                max_shard_size=args.max_shard_size,
                dtype=args.dtype,
                progress=not args.no_progress,
            )
    except (ConversionError, CheckpointMismatchError, FileExistsError) as e:
        print(f"dapo-convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
