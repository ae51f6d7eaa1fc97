"""Megatron-core <-> HF mapping for Qwen3ForCausalLM (dense).

Same layout as Qwen2 but without qkv bias, with per-head RMSNorm on queries and
keys (HF ``self_attn.q_norm`` / ``k_norm`` <-> Megatron ``self_attention.q_layernorm``
/ ``k_layernorm``), and an explicit ``head_dim`` (may differ from hidden/heads).
"""

from __future__ import annotations

from dapo_megatron.models.qwen2 import DecoderLayout, check_common_llama_like, layout_from_hf

__all__ = ["validate_qwen3_config", "qwen3_layout"]


def validate_qwen3_config(hf_config) -> None:
    """Raise ValueError naming the first unsupported option of a Qwen3 config."""
    check_common_llama_like(hf_config)
    if getattr(hf_config, "attention_bias", False):
        raise ValueError("unsupported option attention_bias=True (bias on q/k/v/o projections)")


def qwen3_layout(hf_config, *, tp: int) -> DecoderLayout:
    """Validated :class:`DecoderLayout` for a Qwen3ForCausalLM config."""
    validate_qwen3_config(hf_config)
    return layout_from_hf(hf_config, tp=tp, qkv_bias=False, qk_norm=True)
