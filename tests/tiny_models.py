"""Tiny random Hugging Face models for the tests: one config factory and one way to save a model.

A plain module, not fixtures, so that the torchrun workers can import it too
(``from tests.tiny_models import tiny_config``; the launch helpers put the repository root on
PYTHONPATH).  The shared model directories are fixtures in ``tests/conftest.py``.

Every test states the sizes it needs over :data:`DEFAULTS`; nothing else is implied, so a test's
numbers (and so its tolerances) are exactly those it spells out.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import transformers

FAMILIES = {
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
}
# GQA with 4 query heads (head_dim 16); vocab 300 is padded (to 384 at TP1, 512 at TP2), so
# padded columns are exercised.
DEFAULTS = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=300,
)
# Sharp attention (initializer_range 0.1): a RoPE, layout or permutation error shows up clearly.
SHARP = dict(initializer_range=0.1, rms_norm_eps=1e-5)


def tiny_config(family: str = "qwen2", **overrides) -> transformers.PretrainedConfig:
    """The family's config at :data:`DEFAULTS`, with ``overrides`` (any config field) on top."""
    config_cls, _ = FAMILIES[family]
    return config_cls(**{**DEFAULTS, **overrides})


def metadata_config() -> transformers.PretrainedConfig:
    """A Qwen2 config for checkpoint metadata only (no weights are built from it)."""
    cfg = tiny_config(hidden_size=32, intermediate_size=64, vocab_size=151936)
    cfg.architectures = ["Qwen2ForCausalLM"]
    return cfg


def perturb(model: torch.nn.Module, seed: int, *, biases: bool = True) -> None:
    """Non-trivial norms (and biases) so a swapped or misplaced tensor cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
            elif biases and name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def save_tiny(
    path: str | os.PathLike,
    config: transformers.PretrainedConfig,
    *,
    seed: int = 0,
    perturb_seed: int | None = None,
    perturb_biases: bool = True,
    **save_kwargs,
) -> Path:
    """Build the config's model from ``torch.manual_seed(seed)``, optionally :func:`perturb` it,
    and save it as safetensors (``save_kwargs`` go to ``save_pretrained``, e.g. ``max_shard_size``)."""
    model_cls = next(m for c, m in FAMILIES.values() if isinstance(config, c))
    torch.manual_seed(seed)
    model = model_cls(config)
    if perturb_seed is not None:
        perturb(model, perturb_seed, biases=perturb_biases)
    path = Path(path)
    model.save_pretrained(path, **save_kwargs)
    return path


def make_tiny_hf_models(out_dir: str | os.PathLike) -> list[str]:
    """qwen2_untied, qwen2_tied, qwen3_tied (q/k norm, head_dim != hidden/heads), llama_untied:
    seeds 0..3, perturbed.  The parity, checkpoint and stage-gather tests' models."""
    common = dict(num_hidden_layers=4, max_position_embeddings=256, **SHARP)
    specs = {
        "qwen2_untied": tiny_config(
            **common, tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 5000.0}
        ),
        "qwen2_tied": tiny_config(**common, tie_word_embeddings=True),
        "qwen3_tied": tiny_config("qwen3", **{**common, "num_hidden_layers": 2}, head_dim=24, tie_word_embeddings=True),
        "llama_untied": tiny_config("llama", **{**common, "num_hidden_layers": 2}, tie_word_embeddings=False),
    }
    out_dir = Path(out_dir)
    return [str(save_tiny(out_dir / name, cfg, seed=i, perturb_seed=i)) for i, (name, cfg) in enumerate(specs.items())]


def save_actor_qwen2(path: str | os.PathLike, tie: bool) -> str:
    """The actor tests' Qwen2: vocab 300 padded to 384 (TP1) / 512 (TP2), so padded columns must
    stay out of the softmax; seed 0, not perturbed."""
    cfg = tiny_config(max_position_embeddings=128, tie_word_embeddings=tie, **SHARP)
    return str(save_tiny(path, cfg))
