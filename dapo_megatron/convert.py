"""HF <-> Megatron (torch_dist) checkpoint conversion CLI.

::

    python -m dapo_megatron.convert hf-to-mcore --hf-dir HF --out DIR --tp 2 --pp 2
    python -m dapo_megatron.convert mcore-to-hf --ckpt DIR --out HF [--hf-config-from HF] [--max-shard-size 5GB]

(also installed as ``dapo-convert``).

Why one process whatever ``--tp``/``--pp``: a torch_dist checkpoint stores *global*
tensors and megatron reshards on load, so the checkpoint of a TP=N x PP=M model is
the same set of global tensors as that of a TP=1 model -- except the vocabulary
padding (a multiple of ``128 * N``), which we reproduce for the target ``N``.  The
converter therefore builds the TP=1/PP=1 model on the *meta* device (no memory),
takes megatron's own ``sharded_state_dict`` of it (so keys, stacked-layer axes and
the gated-MLP factories are exactly what a real model asks for on load), fills each
entry from the HF tensors through :mod:`dapo_megatron.models`, and saves it from a
1-rank gloo group.  ``--tp``/``--pp`` validate divisibility and set the padding.

``mcore-to-hf`` reads the checkpoint one transformer layer at a time (megatron loads
any subset of keys) and writes each safetensors shard as soon as its tensors are
ready; ``hf-to-mcore`` holds the converted model once (megatron's writer takes the
whole state dict).  ``bench/convert_memory.py`` measures both.

Every input is validated before anything is written (:mod:`dapo_megatron.convert_validation`)
and output appears atomically (:func:`dapo_megatron.convert_io.staged_output_dir`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import sys
from pathlib import Path

import torch

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
    expected_hf_shapes,
    load_hf_config,
    validate_hf_checkpoint,
)

__all__ = ["hf_to_mcore", "mcore_to_hf", "config_from_metadata", "main"]

HF_SUBDIR = "hf"  # config.json + tokenizer files kept inside a converted checkpoint
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------- helpers
def _progress(iterable, *, desc: str, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit="tensor", disable=not enabled, file=sys.stderr)


class _SingleProcessGroup:
    """A 1-rank gloo/nccl world with megatron's parallel state at TP=PP=1, torn down on exit."""

    def __enter__(self):
        import torch.distributed as dist

        from dapo_megatron.actor.parallel import init_parallel

        if dist.is_initialized() and dist.get_world_size() > 1:
            raise RuntimeError(
                "conversion runs in a single process; call it outside torchrun "
                f"(found a world of {dist.get_world_size()} ranks)"
            )
        init_parallel(1, 1, seed=0)
        return self

    def __exit__(self, *exc):
        from dapo_megatron.actor.parallel import destroy_parallel

        destroy_parallel()
        return False


def _meta_sharded_state_dict(hf_config) -> dict:
    """Megatron's sharded state dict of the full (TP=1, PP=1) model, built on the meta device."""
    from dapo_megatron.actor.model import build_gpt_model

    with torch.device("meta"):
        model = build_gpt_model(hf_config, tp=1, pp=1, pre_process=True, post_process=True)
    return model.sharded_state_dict()


def _with_data(entry, tensor: torch.Tensor):
    """``entry`` (ShardedTensor or factory) carrying ``tensor``; shapes follow the tensor.

    Shapes change only for the vocab-parallel tensors (padding for the target TP); the
    stacked-layer axis (``prepend_axis_num``) is kept.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if isinstance(entry, ShardedTensorFactory):
        return dataclasses.replace(entry, data=tensor)
    if isinstance(entry, ShardedTensor):
        lead = tuple(entry.global_shape[: entry.prepend_axis_num])
        return dataclasses.replace(
            entry,
            data=tensor,
            dtype=tensor.dtype,
            local_shape=tuple(tensor.shape),
            global_shape=lead + tuple(tensor.shape),
        )
    raise TypeError(f"unexpected sharded entry {type(entry).__name__} for {getattr(entry, 'key', '?')}")


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
    from dapo_megatron.actor.checkpoint import apply_checkpoint_cpu_shim, write_checkpoint_metadata
    from dapo_megatron.actor.hf_loading import open_hf_safetensors
    from dapo_megatron.models import get_mapping

    ckpt = validate_hf_checkpoint(hf_dir, tp=tp, pp=pp)  # before the (slow) megatron import
    ensure_output_free(out)
    from megatron.core import dist_checkpointing

    cfg = ckpt.config
    if ckpt.layout.tie_word_embeddings and "lm_head.weight" in ckpt.tensors:
        with open_hf_safetensors(hf_dir) as get:
            if not torch.equal(get("lm_head.weight"), get("model.embed_tokens.weight")):
                raise ConversionError(
                    f"{hf_dir}: tie_word_embeddings=true in config.json but lm_head.weight differs "
                    "from model.embed_tokens.weight"
                )
    mapping = get_mapping(cfg, tp=tp)  # vocab padded for the target TP
    apply_checkpoint_cpu_shim()
    with staged_output_dir(out) as stage, _SingleProcessGroup():
        sharded = _meta_sharded_state_dict(cfg)
        names = [k for k, v in sharded.items() if _is_tensor_entry(v)]
        with open_hf_safetensors(hf_dir) as get:
            for name in _progress(names, desc="hf->mcore", total=len(names), enabled=progress):
                try:
                    full = mapping.hf_to_megatron_full(name, get)
                except (KeyError, ValueError) as e:
                    raise ConversionError(f"converting Megatron tensor {name!r}: {e}") from None
                sharded[name] = _with_data(sharded[name], full.contiguous())
        dist_checkpointing.save(sharded, str(stage))
        del sharded
        write_checkpoint_metadata(stage, cfg, step=None, tp=tp, pp=pp, has_optimizer=False, has_extra_state=False)
        (stage / HF_SUBDIR).mkdir()
        shutil.copy2(Path(hf_dir) / "config.json", stage / HF_SUBDIR / "config.json")
        copy_hf_assets(hf_dir, stage / HF_SUBDIR)
    return Path(out)


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


def _layer_groups(keys: list[str]) -> list[list[str]]:
    """Keys grouped as: pre-layer tensors, each layer's tensors, post-layer tensors (HF order)."""
    import re

    layer_re = re.compile(r"^decoder\.layers\.(\d+)\.")
    layers: dict[int, list[str]] = {}
    pre, post = [], []
    for k in keys:
        m = layer_re.match(k)
        if m:
            layers.setdefault(int(m.group(1)), []).append(k)
        elif k.startswith("embedding."):
            pre.append(k)
        else:
            post.append(k)
    return [g for g in [pre, *(layers[i] for i in sorted(layers)), post] if g]


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
    if dtype is not None and dtype not in _DTYPES:
        raise ConversionError(f"--dtype {dtype!r} is not one of {sorted(_DTYPES)}")
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
    from megatron.core import dist_checkpointing

    stored = dist_checkpointing.load_tensors_metadata(str(directory))
    hf_shapes = expected_hf_shapes(layout)

    with staged_output_dir(out) as stage, _SingleProcessGroup():
        sharded = _meta_sharded_state_dict(cfg)
        names = [k for k, v in sharded.items() if _is_tensor_entry(v)]
        missing = sorted({sharded[k].key for k in names} - set(stored))
        if missing:
            raise ConversionError(f"checkpoint {directory} lacks tensors the model needs: {', '.join(missing[:5])}")

        def out_dtype(name: str) -> torch.dtype:
            return _DTYPES[dtype] if dtype else stored[sharded[name].key].dtype

        order: list[tuple[str, int]] = []
        for name in names:
            for hf_name in mapping.hf_names_for(name) if not _tied_output(name, layout) else []:
                shape = hf_shapes[hf_name]
                order.append((hf_name, math.prod(shape) * dtype_nbytes(out_dtype(name))))
        writer = ShardedSafetensorsWriter(stage, plan_shards(order, max_bytes))
        groups = _layer_groups(names)
        bar = _progress(None, desc="mcore->hf", total=len(names), enabled=progress)
        for group in groups:
            request = {name: _load_request(name, sharded[name], stored[sharded[name].key]) for name in group}
            # a layer is a slice of the stacked tensors: skip the whole-tensor coverage check
            loaded = dist_checkpointing.load(request, str(directory), validate_access_integrity=False)
            for name in group:
                full = loaded.pop(name)
                if request[name].global_shape != tuple(full.shape):  # stacked layers: drop the layer axis
                    full = full[0]
                for hf_name, t in mapping.megatron_full_to_hf(name, full):
                    writer.add(hf_name, t.to(out_dtype(name)))
                bar.update(1)
            del loaded, request
        bar.close()
        writer.finish()
        if (asset_dir / "config.json").is_file():
            shutil.copy2(asset_dir / "config.json", stage / "config.json")
        else:
            cfg.to_json_file(str(stage / "config.json"))
        if asset_dir.is_dir():
            copy_hf_assets(asset_dir, stage)
    return Path(out)


def _load_request(name: str, entry, stored):
    """A plain ShardedTensor that reads this (TP=1) parameter's global tensor, or its layer's slice.

    Megatron stores the layers of a stage stacked along a prepended axis.  Its own
    entries describe that axis as a regular grid, which in a 1-rank world can only be
    loaded whole; an irregular chunk ``[i:i+1]`` (``axis_fragmentations=None``) goes
    through torch DCP's general resharding instead, so one layer is read at a time.
    The gated-MLP factory is bypassed: the stored global fc1 is already ``[gate; up]``.
    Vocab tensors are requested at their stored (padded) size.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    param_shape = tuple(entry.data.shape)
    global_shape = tuple(stored.global_shape)
    if len(global_shape) == len(param_shape) + 1:
        layer = int(name.split(".")[2])
        if global_shape[1:] != param_shape:
            raise ConversionError(f"stored {stored.key} has shape {global_shape}, model expects [L, *{param_shape}]")
        local, offset = (1, *param_shape), (layer,) + (0,) * len(param_shape)
    else:
        vocab = name in ("embedding.word_embeddings.weight", "output_layer.weight")
        if global_shape != param_shape and not (vocab and global_shape[1:] == param_shape[1:]):
            raise ConversionError(f"stored {stored.key} has shape {global_shape}, model expects {param_shape}")
        local, offset = global_shape, (0,) * len(global_shape)
    return ShardedTensor(
        key=stored.key,
        data=torch.empty(local, dtype=stored.dtype),
        dtype=stored.dtype,
        local_shape=local,
        global_shape=global_shape,
        global_offset=offset,
        axis_fragmentations=None,
    )


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
    b.add_argument("--dtype", default=None, choices=sorted(_DTYPES))
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
