"""Megatron-core <-> Hugging Face models: one parameter table per family, one interpreter.

Entry points: :func:`get_layout` here (shapes and counts, free of torch for the planner) and
:func:`dapo_megatron.models.mapping.get_mapping` (the tensors), each from an HF config + TP size.
Supported: Qwen2ForCausalLM (``qwen2``), LlamaForCausalLM (``llama``), Qwen3ForCausalLM
(``qwen3``, dense); :mod:`dapo_megatron.models.decoder` holds the table format.
"""

from dapo_megatron.models import llama, qwen2, qwen3  # noqa: F401  (each registers its family)
from dapo_megatron.models.decoder import (
    DecoderLayout,
    divisibility_problems,
    get_layout,
    model_type_of,
    packed_modules,
    pad_vocab_size,
    read_rope_theta,
)

__all__ = [
    "DecoderLayout",
    "divisibility_problems",
    "get_layout",
    "model_type_of",
    "packed_modules",
    "pad_vocab_size",
    "read_rope_theta",
]
