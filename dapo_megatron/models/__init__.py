"""Megatron-core <-> Hugging Face name/layout mappings, one module per architecture family.

Entry point: :func:`get_mapping` (HF config + TP size -> :class:`DecoderMapping`).
Supported: Qwen2ForCausalLM (``qwen2``), LlamaForCausalLM (``llama``),
Qwen3ForCausalLM (``qwen3``, dense).  See :mod:`dapo_megatron.models.qwen2` for the
parameter table and the TP split rules.
"""

from __future__ import annotations

from dapo_megatron.models.llama import llama_layout
from dapo_megatron.models.qwen2 import (
    DecoderLayout,
    DecoderMapping,
    HFGetter,
    pad_vocab_size,
    qwen2_layout,
    read_rope_theta,
)
from dapo_megatron.models.qwen3 import qwen3_layout

__all__ = [
    "DecoderLayout",
    "DecoderMapping",
    "HFGetter",
    "SUPPORTED_MODEL_TYPES",
    "get_layout",
    "get_mapping",
    "model_type_of",
    "pad_vocab_size",
    "read_rope_theta",
]

_LAYOUTS = {"qwen2": qwen2_layout, "llama": llama_layout, "qwen3": qwen3_layout}
_ARCHS = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3"}
SUPPORTED_MODEL_TYPES = tuple(_LAYOUTS)


def model_type_of(hf_config) -> str:
    """Architecture family key of an HF config; ValueError if unsupported."""
    archs = getattr(hf_config, "architectures", None) or []
    for arch in archs:
        if arch not in _ARCHS:
            raise ValueError(f"unsupported architecture {arch!r}; supported: {sorted(_ARCHS)}")
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in _LAYOUTS:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {SUPPORTED_MODEL_TYPES}")
    return model_type


def get_layout(hf_config, *, tp: int = 1) -> DecoderLayout:
    """Validated layout (shapes + flags, vocab padded for ``tp``) of an HF config."""
    return _LAYOUTS[model_type_of(hf_config)](hf_config, tp=tp)


def get_mapping(hf_config, *, tp: int = 1) -> DecoderMapping:
    """The Megatron <-> HF mapping for an HF config at tensor-parallel size ``tp``."""
    return DecoderMapping(get_layout(hf_config, tp=tp))
