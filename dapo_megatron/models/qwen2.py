"""Qwen2ForCausalLM: the llama decoder template with a bias on q/k/v."""

from dapo_megatron.models import decoder as d
from dapo_megatron.models.llama import llama_rows

QWEN2 = d.register(d.DecoderFamily(model_type="qwen2", architecture="Qwen2ForCausalLM", rows=llama_rows(d.QKV_BIAS)))
