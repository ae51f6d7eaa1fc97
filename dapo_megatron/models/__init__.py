"""Megatron-core <-> Hugging Face models: one parameter table per family, one interpreter.

Entry points: :func:`get_layout` / :func:`get_mapping` (HF config + TP size).  Supported:
Qwen2ForCausalLM (``qwen2``), LlamaForCausalLM (``llama``), Qwen3ForCausalLM (``qwen3``,
dense); :mod:`dapo_megatron.models.decoder` holds the table format and what is derived from it.
"""

from dapo_megatron.models import llama, qwen2, qwen3  # noqa: F401  (each registers its family)
from dapo_megatron.models.decoder import (
    DecoderLayout,
    DecoderMapping,
    HFGetter,
    divisibility_problems,
    get_layout,
    get_mapping,
    model_type_of,
    packed_modules,
    pad_vocab_size,
    read_rope_theta,
)

__all__ = [
    "DecoderLayout",
    "DecoderMapping",
    "HFGetter",
    "divisibility_problems",
    "get_layout",
    "get_mapping",
    "model_type_of",
    "packed_modules",
    "pad_vocab_size",
    "read_rope_theta",
]
