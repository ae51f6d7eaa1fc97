"""LlamaForCausalLM: the llama decoder template, no biases.

Llama's ``attention_bias`` puts a bias on q/k/v *and* o_proj, and ``mlp_bias`` on all MLP
projections; Megatron's ``add_bias_linear`` cannot express those combinations with our
table, so both are refused.
"""

from dapo_megatron.models import decoder as d


def llama_rows(*attention_extras: d.ParamRow) -> tuple[d.ParamRow, ...]:
    """The llama template's table; a family built on it adds its attention rows after the q/k/v weight."""
    attention = (d.INPUT_NORM, d.QKV_WEIGHT, *attention_extras, d.ATTN_PROJ)
    mlp = (d.PRE_MLP_NORM, d.FC1, d.FC2)
    return (d.EMBEDDING, *attention, *mlp, d.FINAL_NORM, d.OUTPUT)


LLAMA = d.register(
    d.DecoderFamily(
        model_type="llama",
        architecture="LlamaForCausalLM",
        rows=llama_rows(),
        refuses=(("attention_bias", "bias on q/k/v/o projections"), ("mlp_bias", "")),
    )
)
