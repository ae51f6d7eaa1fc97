"""Qwen2ForCausalLM: the llama decoder template with a bias on q/k/v."""

from dapo_megatron.models import decoder as d

QWEN2 = d.register(
    d.DecoderFamily(
        model_type="qwen2",
        architecture="Qwen2ForCausalLM",
        rows=(
            d.EMBEDDING,
            d.INPUT_NORM,
            d.QKV_WEIGHT,
            d.QKV_BIAS,
            d.ATTN_PROJ,  # attention
            d.PRE_MLP_NORM,
            d.FC1,
            d.FC2,  # MLP
            d.FINAL_NORM,
            d.OUTPUT,
        ),  # fmt: skip
    )
)
