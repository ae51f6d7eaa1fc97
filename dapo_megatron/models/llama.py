"""Megatron-core <-> HF mapping for LlamaForCausalLM: the Qwen2 layout without qkv bias.

Llama's ``attention_bias`` puts a bias on q/k/v *and* o_proj, and ``mlp_bias`` on
all MLP projections; Megatron's ``add_bias_linear`` cannot express those
combinations with our mapping, so both are rejected.
"""

from __future__ import annotations

from dapo_megatron.models.qwen2 import DecoderLayout, check_common_llama_like, layout_from_hf

__all__ = ["validate_llama_config", "llama_layout"]


def validate_llama_config(hf_config) -> None:
    """Raise ValueError naming the first unsupported option of a Llama config."""
    check_common_llama_like(hf_config)
    if getattr(hf_config, "attention_bias", False):
        raise ValueError("unsupported option attention_bias=True (bias on q/k/v/o projections)")
    if getattr(hf_config, "mlp_bias", False):
        raise ValueError("unsupported option mlp_bias=True")


def llama_layout(hf_config, *, tp: int) -> DecoderLayout:
    """Validated :class:`DecoderLayout` for a LlamaForCausalLM config."""
    validate_llama_config(hf_config)
    return layout_from_hf(hf_config, tp=tp, qkv_bias=False, qk_norm=False)
