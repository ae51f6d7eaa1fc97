"""Checks run by the conversion CLI before it writes anything.

Why a separate pass: a conversion of a 32B model takes minutes and tens of GB; a
config/tensor inconsistency found half-way would leave the user with nothing but a
traceback.  Everything here reads only ``config.json`` and the safetensors *headers*
(no tensor data, no megatron import), so it runs in seconds on any checkpoint and
reports every problem at once.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from dapo_megatron.models import DecoderLayout, divisibility_problems, get_layout, read_rope_theta

__all__ = [
    "ConversionError",
    "HFCheckpoint",
    "TensorInfo",
    "read_safetensors_header",
    "scan_hf_safetensors",
    "validate_hf_checkpoint",
    "validate_layout",
]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# HF buffers that some checkpoints carry but that are recomputed, never mapped
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class ConversionError(ValueError):
    """The input of a conversion is invalid; the message names the file/key/tensor."""


@dataclass(frozen=True)
class TensorInfo:
    """Where an HF tensor lives and what its header says."""

    file: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class HFCheckpoint:
    """A validated HF checkpoint directory."""

    path: Path
    config: object  # transformers.PretrainedConfig
    layout: DecoderLayout
    tensors: dict[str, TensorInfo]


def read_safetensors_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Tensor names -> :class:`TensorInfo` from a safetensors header, checking the file is complete.

    Raises:
        ConversionError: unreadable header or a file shorter than its header says (truncated).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ConversionError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise ConversionError(f"{path}: truncated safetensors file (header of {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"{path}: corrupt safetensors header ({e})") from None
    out: dict[str, TensorInfo] = {}
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin_off, end_off = entry["data_offsets"]
            out[name] = TensorInfo(path.name, str(entry["dtype"]), tuple(int(x) for x in entry["shape"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ConversionError(f"{path}: corrupt safetensors header entry {name!r} ({e})") from None
        end = max(end, int(end_off))
    if 8 + n + end > size:
        raise ConversionError(
            f"{path}: truncated safetensors file: header needs {8 + n + end} bytes, file has {size} "
            "(interrupted download or copy?)"
        )
    return out


def scan_hf_safetensors(hf_dir: str | os.PathLike) -> dict[str, TensorInfo]:
    """Every tensor of an HF checkpoint (single file or index + shards), headers only.

    Raises:
        ConversionError: no safetensors, a shard named in the index is missing, a tensor
            listed in the index is not in its shard, or a shard is truncated.
    """
    hf_dir = Path(hf_dir)
    index = hf_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ConversionError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        missing = [fn for fn in files if not (hf_dir / fn).is_file()]
        if missing:
            raise ConversionError(f"{index} lists shard file(s) that do not exist in {hf_dir}: {', '.join(missing)}")
        tensors: dict[str, TensorInfo] = {}
        for fn in files:
            tensors.update(read_safetensors_header(hf_dir / fn))
        absent = [(name, fn) for name, fn in weight_map.items() if tensors.get(name, TensorInfo(fn, "", ())).file != fn]
        if absent:
            name, fn = absent[0]
            raise ConversionError(f"{index} maps {name!r} to {fn}, which does not contain it ({len(absent)} such)")
        return tensors
    single = hf_dir / SINGLE_FILE
    if not single.is_file():
        raise ConversionError(f"no {SINGLE_FILE} or {INDEX_FILE} in {hf_dir} (only safetensors are supported)")
    return read_safetensors_header(single)


def validate_layout(layout: DecoderLayout, *, tp: int, pp: int) -> list[str]:
    """Problems (empty if none) with running ``layout`` at ``tp`` x ``pp``."""
    if tp < 1 or pp < 1:
        return [f"tp and pp must be >= 1 (got tp={tp} pp={pp})"]
    return [str(p) for p in divisibility_problems(layout, tp=tp, pp=pp)]


def _config_problems(hf_config) -> list[str]:
    problems = []
    try:
        theta = read_rope_theta(hf_config)
        if not (math.isfinite(theta) and theta > 0):
            problems.append(f"rope_theta={theta} must be a positive finite number")
    except ValueError as e:
        problems.append(str(e))
    eps = getattr(hf_config, "rms_norm_eps", None)
    if not isinstance(eps, (int, float)) or not (math.isfinite(eps) and 0 < eps < 1):
        problems.append(f"rms_norm_eps={eps!r} must be a number in (0, 1)")
    return problems


def _tensor_problems(layout: DecoderLayout, tensors: dict[str, TensorInfo], hf_config) -> list[str]:
    problems = []
    expected = layout.hf_shapes()
    emb = tensors.get("model.embed_tokens.weight")
    if emb is not None and emb.shape and emb.shape[0] != layout.vocab_size:
        problems.append(
            f"vocab_size={layout.vocab_size} in config.json but model.embed_tokens.weight has {emb.shape[0]} rows"
        )
    for name, shape in expected.items():
        info = tensors.get(name)
        if info is None:
            if name == "lm_head.weight":
                problems.append("tie_word_embeddings=false in config.json but the checkpoint has no lm_head.weight")
            elif name.endswith("_proj.bias"):
                problems.append(f"{layout_family(hf_config)} expects a qkv bias but {name} is missing")
            else:
                problems.append(f"missing tensor {name} (expected shape {shape})")
        elif info.shape != shape and not (name == "model.embed_tokens.weight" and emb.shape[0] != layout.vocab_size):
            problems.append(f"tensor {name} in {info.file} has shape {info.shape}, config.json implies {shape}")
    extra = sorted(n for n in tensors if n not in expected and not n.endswith(_IGNORED_SUFFIXES))
    if layout.tie_word_embeddings and "lm_head.weight" in extra:
        extra.remove("lm_head.weight")  # some tied checkpoints store the copy; compared when read
    biases = [n for n in extra if n.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))]
    if biases and not layout.qkv_bias:
        problems.append(
            f"the checkpoint has qkv biases ({biases[0]}, ...) but {layout_family(hf_config)} "
            "(config.json) has none: wrong architecture or attention_bias setting?"
        )
        extra = [n for n in extra if n not in biases]
    if extra:
        more = f" (+{len(extra) - 5} more)" if len(extra) > 5 else ""
        problems.append(f"unexpected tensors not described by config.json: {', '.join(extra[:5])}{more}")
    return problems


def layout_family(hf_config) -> str:
    """Human-readable family/architecture for messages."""
    archs = getattr(hf_config, "architectures", None) or []
    return archs[0] if archs else str(getattr(hf_config, "model_type", "?"))


def load_hf_config(hf_dir: str | os.PathLike):
    """``AutoConfig`` of an HF directory, with a clear error when config.json is absent or bad."""
    from transformers import AutoConfig

    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"no config.json in {hf_dir}")
    try:
        return AutoConfig.from_pretrained(str(hf_dir))
    except (ValueError, KeyError, OSError) as e:
        raise ConversionError(f"{path}: cannot be read as a transformers config ({e})") from None


def validate_hf_checkpoint(hf_dir: str | os.PathLike, *, tp: int = 1, pp: int = 1) -> HFCheckpoint:
    """Validate an HF checkpoint directory for conversion to a ``tp`` x ``pp`` layout.

    Checks: config.json readable, architecture supported, unsupported options (rope
    scaling, MoE, sliding window, ...), heads/kv heads/FFN divisible by tp, layers by pp,
    rope theta and rms eps sane, safetensors complete (index shards present, no
    truncation), every expected tensor present with the shape config.json implies
    (vocab vs embedding rows, lm_head vs tie_word_embeddings, qkv bias vs family).

    Raises:
        ConversionError: listing every problem found.
    """
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ConversionError(f"HF directory {hf_dir} does not exist")
    config = load_hf_config(hf_dir)
    try:
        layout = get_layout(config, tp=1)
    except ValueError as e:
        raise ConversionError(f"{hf_dir}/config.json: {e}") from None
    problems = validate_layout(layout, tp=tp, pp=pp) + _config_problems(config)
    tensors = scan_hf_safetensors(hf_dir)
    problems += _tensor_problems(layout, tensors, config)
    if problems:
        raise ConversionError(f"cannot convert {hf_dir}:\n  - " + "\n  - ".join(problems))
    return HFCheckpoint(path=hf_dir, config=config, layout=layout, tensors=tensors)
