"""Qwen3ForCausalLM (dense): the llama decoder template with per-head RMSNorm on q and k, no biases.

HF ``self_attn.q_norm`` / ``k_norm`` are Megatron's ``self_attention.q_layernorm`` /
``k_layernorm``; ``head_dim`` is explicit (may differ from hidden / heads).
"""

from dapo_megatron.models import decoder as d
from dapo_megatron.models.llama import llama_rows

QWEN3 = d.register(
    d.DecoderFamily(
        model_type="qwen3",
        architecture="Qwen3ForCausalLM",
        rows=llama_rows(d.Q_NORM, d.K_NORM),
        refuses=(("attention_bias", "bias on q/k/v/o projections"),),
    )
)
