"""LlamaForCausalLM: the llama decoder template, no biases.

Llama's ``attention_bias`` puts a bias on q/k/v *and* o_proj, and ``mlp_bias`` on all MLP
projections; Megatron's ``add_bias_linear`` cannot express those combinations with our
table, so both are refused.
"""

from dapo_megatron.models import decoder as d

LLAMA = d.register(
    d.DecoderFamily(
        model_type="llama",
        architecture="LlamaForCausalLM",
        rows=(
            d.EMBEDDING,
            d.INPUT_NORM,
            d.QKV_WEIGHT,
            d.ATTN_PROJ,  # attention
            d.PRE_MLP_NORM,
            d.FC1,
            d.FC2,  # MLP
            d.FINAL_NORM,
            d.OUTPUT,
        ),  # fmt: skip
        refuses=(("attention_bias", "bias on q/k/v/o projections"), ("mlp_bias", "")),
    )
)
