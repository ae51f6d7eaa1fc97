"""Checks run by the converter before it writes anything.

Why a separate pass: a conversion of a 32B model takes minutes and tens of GB; a
config/tensor inconsistency found half-way would leave the user with nothing but a
traceback.  Everything here reads only ``config.json`` and the safetensors *headers*
(no tensor data, no megatron import), so it runs in seconds on any checkpoint and
reports every problem at once.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig

from dapo_megatron.checkpoint.hf_reader import SafetensorsError, TensorInfo, scan_hf_safetensors
from dapo_megatron.models import DecoderLayout, divisibility_problems, get_layout, read_rope_theta

__all__ = [
    "ConversionError",
    "HFCheckpoint",
    "validate_hf_checkpoint",
    "validate_layout",
]

# HF buffers that some checkpoints carry but that are recomputed, never mapped
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class ConversionError(ValueError):
    """The input of a conversion is invalid; the message names the file/key/tensor."""


@dataclass(frozen=True)
class HFCheckpoint:
    """A validated HF checkpoint directory."""

    path: Path
    config: object  # transformers.PretrainedConfig
    layout: DecoderLayout
    tensors: dict[str, TensorInfo]


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
    try:
        tensors = scan_hf_safetensors(hf_dir)
    except SafetensorsError as e:
        raise ConversionError(str(e)) from None
    problems += _tensor_problems(layout, tensors, config)
    if problems:
        raise ConversionError(f"cannot convert {hf_dir}:\n  - " + "\n  - ".join(problems))
    return HFCheckpoint(path=hf_dir, config=config, layout=layout, tensors=tensors)
