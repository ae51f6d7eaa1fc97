"""``dapo_checkpoint.json``: which model a checkpoint holds, how it was saved, and the checks on load.

Why a file of our own beside megatron's: megatron's metadata describes tensors, not the
model, so a checkpoint of another model would load until the first shape mismatch.  The
identity keys (:data:`IDENTITY_KEYS`) are compared before anything is read, and the full HF
config stored here is what an export writes back as ``config.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dapo_megatron.checkpoint.files import atomic_write_text
from dapo_megatron.checkpoint.layout import META_FILE, resolve_checkpoint_dir
from dapo_megatron.models import get_layout, model_type_of

FORMAT_VERSION = 1
# what save_checkpoint passes to megatron's DistributedOptimizer.sharded_state_dict
OPTIMIZER_SHARDING_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
# sharding types this module loads, and the ones bound to the TP x PP layout of the save
LOADABLE_SHARDINGS = ("fully_reshardable", "dp_reshardable")
_LAYOUT_BOUND_SHARDINGS = ("dp_reshardable",)

# keys of model_metadata() compared on load: a mismatch means "another model"
IDENTITY_KEYS = (
    "architecture",
    "model_type",
    "hidden_size",
    "num_layers",
    "vocab_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "tie_word_embeddings",
    "qkv_bias",
    "qk_norm",
)


class CheckpointMismatchError(ValueError):
    """The checkpoint was written for a different model than the one being loaded."""


def model_metadata(hf_config) -> dict[str, Any]:
    """Identity of the model (compared on load) plus the full HF config (used by export).

    Raises:
        ValueError: unsupported architecture (from :func:`dapo_megatron.models.get_layout`).
    """
    layout = get_layout(hf_config, tp=1)
    archs = list(getattr(hf_config, "architectures", None) or [])
    return {
        "architecture": archs[0] if archs else None,
        "model_type": model_type_of(hf_config),
        "hidden_size": layout.hidden_size,
        "num_layers": layout.num_layers,
        "vocab_size": layout.vocab_size,
        "num_attention_heads": layout.num_attention_heads,
        "num_key_value_heads": layout.num_query_groups,
        "head_dim": layout.head_dim,
        "intermediate_size": layout.ffn_hidden_size,
        "tie_word_embeddings": layout.tie_word_embeddings,
        "qkv_bias": layout.qkv_bias,
        "qk_norm": layout.qk_norm,
    }


def check_compatible(saved: Mapping[str, Any], hf_config, *, where: str = "checkpoint") -> None:
    """Raise :class:`CheckpointMismatchError` naming every identity key that differs."""
    want = model_metadata(hf_config)
    saved_model = saved.get("model", saved)
    diffs = [
        f"{k}: checkpoint has {saved_model.get(k)!r}, model has {want[k]!r}"
        for k in IDENTITY_KEYS
        if saved_model.get(k) != want[k]
    ]
    if diffs:
        raise CheckpointMismatchError(f"{where} belongs to another model: " + "; ".join(diffs))


def check_transformer_impl(saved: Mapping[str, Any], transformer_impl: str, *, where: str = "checkpoint") -> None:
    """Refuse a checkpoint written by the other layer implementation, naming the setting.

    The Transformer-Engine spec fuses the two pre-norms into the following linears, so its
    checkpoint keys (``linear_qkv.layer_norm_weight``) are not the local spec's
    (``input_layernorm.weight``): megatron's load would fail on missing keys.  Checkpoints
    without the field were written before it existed, by CPU runs: the local spec.
    """
    impl = saved.get("transformer_impl", "local")
    if impl != transformer_impl:
        raise CheckpointMismatchError(
            f"{where} was written by a {impl} model and this one is {transformer_impl} "
            f"(actor.transformer_impl): the two layer specs name the pre-norm weights differently; "
            f"set actor.transformer_impl={impl}, or start from the HF weights (actor.model_path)"
        )


def check_optimizer_layout(saved: Mapping[str, Any], tp: int, pp: int, *, where: str = "checkpoint") -> str:
    """The optimizer sharding type of ``saved`` (``dapo_checkpoint.json``), checked against a TP x PP load.

    ``fully_reshardable`` state loads at any layout; ``dp_reshardable`` state (earlier
    versions' default) only at the TP x PP it was saved with.

    Raises:
        ValueError: no optimizer state, an unknown sharding type, or a layout-bound state at
            another layout (the message says how to proceed).
    """
    if not saved.get("has_optimizer"):
        raise ValueError(f"{where} has no optimizer state (has_optimizer=false)")
    sharding = (saved.get("optimizer_sharding") or {}).get("distrib_optim_sharding_type")
    if sharding not in LOADABLE_SHARDINGS:
        raise ValueError(
            f"{where}: optimizer_sharding.distrib_optim_sharding_type={sharding!r} is not one of {LOADABLE_SHARDINGS}"
        )
    layout = saved.get("saved_layout") or {}
    if sharding in _LAYOUT_BOUND_SHARDINGS and (layout.get("tp"), layout.get("pp")) != (tp, pp):
        raise ValueError(
            f"{where} holds optimizer state in megatron's {sharding!r} format, saved at tp={layout.get('tp')} "
            f"pp={layout.get('pp')}; that format only loads at the same tensor/pipeline layout (now tp={tp} pp={pp}). "
            "Resume once at the saved layout and save again (new checkpoints use 'fully_reshardable', which loads "
            "at any layout), or load the model only"
        )
    return sharding


def write_checkpoint_metadata(
    directory: str | os.PathLike,
    hf_config,
    *,
    step: int | None,
    tp: int,
    pp: int,
    has_optimizer: bool,
    has_extra_state: bool,
    rank_state_world_size: int | None = None,
    optimizer_sharding: str = OPTIMIZER_SHARDING_METADATA["distrib_optim_sharding_type"],
    transformer_impl: str = "local",
    manifest: bool = False,
    run_config: Mapping[str, Any] | None = None,
) -> None:
    """Write ``dapo_checkpoint.json`` (single writer: call on one rank only).

    ``manifest=True`` promises a ``manifest.json`` written after this file: a checkpoint that
    records one and lacks it is damaged, not legacy.  ``run_config`` (the trainer's whole
    configuration, JSON types) lets a resume say which settings changed.
    """
    meta = {
        "manifest": manifest,
        "run_config": dict(run_config) if run_config is not None else None,
        "transformer_impl": transformer_impl,
        "format_version": FORMAT_VERSION,
        "step": step,
        "saved_layout": {"tp": tp, "pp": pp},
        "has_optimizer": has_optimizer,
        "optimizer_sharding": {"distrib_optim_sharding_type": optimizer_sharding} if has_optimizer else None,
        "has_extra_state": has_extra_state,
        "rank_state_world_size": rank_state_world_size,
        "model": model_metadata(hf_config),
        "hf_config": hf_config.to_dict(),
    }
    atomic_write_text(Path(directory) / META_FILE, json.dumps(meta, indent=2, sort_keys=True, default=str))


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """``dapo_checkpoint.json`` of a checkpoint (a step dir or a root with ``latest``)."""
    directory = resolve_checkpoint_dir(path)
    with open(directory / META_FILE) as f:
        return json.load(f)
