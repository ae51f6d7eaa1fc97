"""Megatron-core <-> Hugging Face mapping for Qwen2 (and the llama-family layout it shares).

Qwen2, Llama and Qwen3 decoders have the same parameter structure; they differ only
in a few flags (qkv bias: Qwen2; q/k RMSNorm: Qwen3; explicit ``head_dim``:
Qwen3/Llama).  This file holds the generic :class:`DecoderMapping`, driven by a
:class:`DecoderLayout`; ``llama.py`` and ``qwen3.py`` only build a layout with
their flags and validate their configs.

Everything here is pure tensor/name manipulation (no torch.distributed, no
megatron import), so the same functions serve

(a) HF -> Megatron loading for any TP rank and PP stage:
    :meth:`DecoderMapping.hf_to_megatron_shard` (``layer_offset`` = global index
    of the stage's first layer),
(b) Megatron -> HF export: :meth:`DecoderMapping.merge_tp_shards` then
    :meth:`DecoderMapping.megatron_full_to_hf`,
(c) per-step weight sync, streaming one parameter at a time: the caller
    all-gathers one parameter's TP shards, merges, converts, pushes, frees.

Megatron parameter names (local spec, PP-stage-local layer index ``i``)::

    embedding.word_embeddings.weight                 [Vp, H]   vocab-parallel, dim 0
    decoder.layers.i.input_layernorm.weight          [H]       replicated
    decoder.layers.i.self_attention.linear_qkv.weight [(nq+2ng)d, H] column (whole KV groups)
    decoder.layers.i.self_attention.linear_qkv.bias  [(nq+2ng)d]     column (whole KV groups)
    decoder.layers.i.self_attention.q_layernorm.weight [d]     replicated (Qwen3)
    decoder.layers.i.self_attention.k_layernorm.weight [d]     replicated (Qwen3)
    decoder.layers.i.self_attention.linear_proj.weight [H, nq d] row, dim 1
    decoder.layers.i.pre_mlp_layernorm.weight        [H]       replicated
    decoder.layers.i.mlp.linear_fc1.weight           [2F, H]   [gate; up], each split on dim 0
    decoder.layers.i.mlp.linear_fc2.weight           [H, F]    row, dim 1
    decoder.final_layernorm.weight                   [H]       replicated
    output_layer.weight                              [Vp, H]   vocab-parallel, dim 0

With the Transformer-Engine spec the two pre-norms are fused into the following
linear and are named ``decoder.layers.i.self_attention.linear_qkv.layer_norm_weight``
(= ``input_layernorm``) and ``decoder.layers.i.mlp.linear_fc1.layer_norm_weight``
(= ``post_attention_layernorm``); both spellings are accepted everywhere
(``_extra_state`` entries of TE modules are not parameters and are not mapped).

Fused QKV layout: Megatron interleaves per KV group ``g``:
``[q heads of group g (nq/ng heads), k_g, v_g]`` for g = 0..ng-1, each head ``d``
rows.  TP rank r therefore owns groups ``[r*ng/tp, (r+1)*ng/tp)`` which is just the
r-th contiguous chunk of the fused tensor along dim 0.

Vocabulary: Megatron's embedding/output rows are padded to ``padded_vocab_size``
(a multiple of ``128 * tp``); padded rows are zero on import and dropped on export.
Padded logits are therefore 0 (not -inf): consumers must slice logits to
``vocab_size`` before any softmax.

Tied embeddings: HF has no ``lm_head.weight``; Megatron has no ``output_layer.weight``
at PP=1 but the last PP stage holds a copy when PP>1; it is loaded from
``model.embed_tokens.weight`` and skipped on export.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily: the planner reads layouts without paying for torch
    import torch

__all__ = [
    "DecoderLayout",
    "DecoderMapping",
    "HFGetter",
    "pad_vocab_size",
    "read_rope_theta",
    "validate_qwen2_config",
    "qwen2_layout",
]

HFGetter = Callable[[str], "torch.Tensor"]
"""Returns the full HF tensor for an HF parameter name (raises KeyError if absent)."""

# TP split kinds
REPLICATED = "replicated"
COLUMN = "column"  # split dim 0 (includes fused QKV: whole KV groups per rank)
ROW = "row"  # split dim 1
VOCAB = "vocab"  # split dim 0 after vocab padding
GATED_FC1 = "gated_fc1"  # [gate; up]: split each half on dim 0, concatenate

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# Megatron layer-suffix -> (kind, hf suffix(es) below "model.layers.{g}.")
_INPUT_NORM = ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight")
_POST_NORM = ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight")


def pad_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Smallest multiple of ``divisible_by * tp`` that is >= ``vocab_size``."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def read_rope_theta(hf_config) -> float:
    """RoPE base from a HF config (transformers 5 ``rope_parameters`` or 4.x ``rope_theta``).

    Raises:
        ValueError: if RoPE scaling of any kind other than ``default`` is configured.
    """
    params = getattr(hf_config, "rope_parameters", None)
    if params:
        # transformers 5 may nest per-layer-type parameters; we support only the flat form
        if "rope_theta" not in params and all(isinstance(v, dict) for v in params.values()):
            raise ValueError(f"unsupported rope_parameters (per layer type): {params}")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in (None, "default"):
            raise ValueError(f"unsupported option rope_parameters.rope_type={rope_type!r} (rope scaling)")
        if "rope_theta" in params:
            return float(params["rope_theta"])
    scaling = getattr(hf_config, "rope_scaling", None)
    if scaling:
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in (None, "default"):
            raise ValueError(f"unsupported option rope_scaling={scaling!r}")
    theta = getattr(hf_config, "rope_theta", None)
    if theta is None:
        raise ValueError("HF config has neither rope_parameters['rope_theta'] nor rope_theta")
    return float(theta)


@dataclass(frozen=True)
class DecoderLayout:
    """Shapes and flags of a llama-family decoder (everything the mapping needs)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int  # the HF vocabulary (unpadded)
    padded_vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    qk_norm: bool = False

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_query_groups}"
            )
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError("padded_vocab_size < vocab_size")

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    # The counts below are what memory and FLOPs depend on (the planner's arithmetic); they
    # use the HF vocabulary, not the padded one.
    @property
    def qkv_rows(self) -> int:
        return (self.num_attention_heads + 2 * self.num_query_groups) * self.head_dim

    def layer_sharded_params(self) -> int:
        """Parameters of one layer that tensor parallelism splits (QKV, proj, FC1, FC2, QKV bias)."""
        h, f = self.hidden_size, self.ffn_hidden_size
        qkv = self.qkv_rows * h + (self.qkv_rows if self.qkv_bias else 0)
        proj = h * self.num_attention_heads * self.head_dim
        return qkv + proj + 3 * h * f

    def layer_replicated_params(self) -> int:
        """Parameters every TP rank holds in full (the two RMSNorms, q/k norms)."""
        return 2 * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0)

    def non_embedding_params(self) -> int:
        return self.num_layers * (self.layer_sharded_params() + self.layer_replicated_params()) + self.hidden_size

    def total_params(self) -> int:
        """The HF parameter count (unpadded vocabulary)."""
        embed = self.vocab_size * self.hidden_size
        return self.non_embedding_params() + embed * (1 if self.tie_word_embeddings else 2)

    def matmul_params(self) -> int:
        """Parameters that multiply every token: P of ``6 P T``.

        The input embedding is a row lookup, no FLOPs: an untied model counts its output
        layer once, not its embedding too (tied, the one matrix is the output layer).
        """
        return self.non_embedding_params() + self.vocab_size * self.hidden_size


class DecoderMapping:
    """Name/layout mapping between a Megatron GPTModel and an HF llama-family model."""

    def __init__(self, layout: DecoderLayout):
        self.layout = layout

    # ------------------------------------------------------------------ names
    @staticmethod
    def _parse(megatron_name: str, layer_offset: int) -> tuple[int | None, str]:
        """-> (global layer index or None, layer-relative suffix or the top-level name)."""
        m = _LAYER_RE.match(megatron_name)
        if m:
            return int(m.group(1)) + layer_offset, m.group(2)
        return None, megatron_name

    def hf_names_for(self, megatron_name: str, layer_offset: int = 0) -> list[str]:
        """HF tensor names that make up one Megatron parameter (in concatenation order)."""
        L = self.layout
        layer, suffix = self._parse(megatron_name, layer_offset)
        if layer is None:
            if suffix == "embedding.word_embeddings.weight":
                return ["model.embed_tokens.weight"]
            if suffix == "decoder.final_layernorm.weight":
                return ["model.norm.weight"]
            if suffix == "output_layer.weight":
                return ["model.embed_tokens.weight" if L.tie_word_embeddings else "lm_head.weight"]
            raise KeyError(f"no HF mapping for Megatron parameter {megatron_name!r}")
        if not 0 <= layer < L.num_layers:
            raise KeyError(
                f"{megatron_name!r} with layer_offset={layer_offset} is global layer {layer}, "
                f"outside [0, {L.num_layers})"
            )
        p = f"model.layers.{layer}."
        if suffix in _INPUT_NORM:
            return [p + "input_layernorm.weight"]
        if suffix in _POST_NORM:
            return [p + "post_attention_layernorm.weight"]
        if suffix == "self_attention.linear_qkv.weight":
            return [p + f"self_attn.{x}_proj.weight" for x in "qkv"]
        if suffix == "self_attention.linear_qkv.bias" and L.qkv_bias:
            return [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
        if suffix == "self_attention.q_layernorm.weight" and L.qk_norm:
            return [p + "self_attn.q_norm.weight"]
        if suffix == "self_attention.k_layernorm.weight" and L.qk_norm:
            return [p + "self_attn.k_norm.weight"]
        if suffix == "self_attention.linear_proj.weight":
            return [p + "self_attn.o_proj.weight"]
        if suffix == "mlp.linear_fc1.weight":
            return [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]
        if suffix == "mlp.linear_fc2.weight":
            return [p + "mlp.down_proj.weight"]
        raise KeyError(f"no HF mapping for Megatron parameter {megatron_name!r}")

    def megatron_names(
        self,
        *,
        layers: range | None = None,
        pre_process: bool = True,
        post_process: bool = True,
        include_tied_output: bool = False,
        te_names: bool = False,
    ) -> list[str]:
        """Megatron parameter names of one PP stage (layer indices local to ``layers``).

        ``layers`` are the stage's *global* layer indices (default: all); the names use
        local indices 0..len(layers)-1 as Megatron does.  ``include_tied_output``
        adds ``output_layer.weight`` for tied models (last stage when PP>1).
        """
        L = self.layout
        layers = range(L.num_layers) if layers is None else layers
        names: list[str] = []
        if pre_process:
            names.append("embedding.word_embeddings.weight")
        for i in range(len(layers)):
            p = f"decoder.layers.{i}."
            names.append(p + (_INPUT_NORM[1] if te_names else _INPUT_NORM[0]))
            names.append(p + "self_attention.linear_qkv.weight")
            if L.qkv_bias:
                names.append(p + "self_attention.linear_qkv.bias")
            if L.qk_norm:
                names += [p + "self_attention.q_layernorm.weight", p + "self_attention.k_layernorm.weight"]
            names.append(p + "self_attention.linear_proj.weight")
            names.append(p + (_POST_NORM[1] if te_names else _POST_NORM[0]))
            names += [p + "mlp.linear_fc1.weight", p + "mlp.linear_fc2.weight"]
        if post_process:
            names.append("decoder.final_layernorm.weight")
            if not L.tie_word_embeddings or include_tied_output:
                names.append("output_layer.weight")
        return names

    def tied_aliases(self) -> dict[str, str]:
        """HF names an inference engine keeps for a tensor the checkpoint stores once: alias -> source.

        A tied model's HF checkpoint has no ``lm_head.weight``, but vLLM builds the LM head as
        its own layer with its own post-load processing (on CPU, a repacked GEMM kernel), so
        an update that only reaches the embedding leaves the head's kernel on the old
        weights.  Weight sync sends the embedding a second time under this name, through
        the head's own loader.
        """
        return {"lm_head.weight": "model.embed_tokens.weight"} if self.layout.tie_word_embeddings else {}

    def hf_names(self) -> list[str]:
        """All HF parameter names of the full model (the export set)."""
        out: list[str] = []
        for name in self.megatron_names():
            out += self.hf_names_for(name)
        return out

    # ------------------------------------------------------------ TP rules
    def tp_kind(self, megatron_name: str) -> str:
        """TP split kind of a parameter: replicated, column, row, vocab or gated_fc1."""
        layer, suffix = self._parse(megatron_name, 0)
        if layer is None:
            if suffix in ("embedding.word_embeddings.weight", "output_layer.weight"):
                return VOCAB
            if suffix == "decoder.final_layernorm.weight":
                return REPLICATED
        else:
            if suffix.startswith("self_attention.linear_qkv.") and suffix != _INPUT_NORM[1]:
                return COLUMN
            if suffix in ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight"):
                return ROW
            if suffix == "mlp.linear_fc1.weight":
                return GATED_FC1
            if suffix in _INPUT_NORM + _POST_NORM or suffix.endswith("_layernorm.weight"):
                return REPLICATED
        raise KeyError(f"no TP rule for Megatron parameter {megatron_name!r}")

    def partition_dim(self, megatron_name: str) -> int | None:
        """Dimension along which the parameter is TP-sharded (None = replicated)."""
        kind = self.tp_kind(megatron_name)
        return {REPLICATED: None, ROW: 1}.get(kind, 0)

    def _check_tp(self, megatron_name: str, tp_size: int) -> None:
        if self.tp_kind(megatron_name) == COLUMN and self.layout.num_query_groups % tp_size:
            raise ValueError(
                f"{megatron_name}: num_key_value_heads={self.layout.num_query_groups} is not divisible by tp={tp_size}"
            )

    def split_for_tp(self, megatron_name: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
        """The ``tp_rank``-th TP shard of a full (unsharded, padded) Megatron tensor."""
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank={tp_rank} outside [0, {tp_size})")
        kind = self.tp_kind(megatron_name)
        if kind == REPLICATED or tp_size == 1:
            return full
        self._check_tp(megatron_name, tp_size)
        if kind == GATED_FC1:
            gate, up = full.chunk(2, dim=0)
            return _cat(
                [_chunk(megatron_name, gate, 0, tp_rank, tp_size), _chunk(megatron_name, up, 0, tp_rank, tp_size)],
                dim=0,
            )
        return _chunk(megatron_name, full, self.partition_dim(megatron_name), tp_rank, tp_size)

    def merge_tp_shards(self, megatron_name: str, shards: list[torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`split_for_tp`: rebuild the full tensor from all TP shards."""
        kind = self.tp_kind(megatron_name)
        if kind == REPLICATED or len(shards) == 1:
            return shards[0]
        self._check_tp(megatron_name, len(shards))
        if kind == GATED_FC1:
            halves = [s.chunk(2, dim=0) for s in shards]
            return _cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
        return _cat(shards, dim=self.partition_dim(megatron_name))

    # ----------------------------------------------------------- HF <-> Megatron
    def hf_to_megatron_full(self, megatron_name: str, get_hf: HFGetter, layer_offset: int = 0) -> torch.Tensor:
        """Full (unsharded; vocab-padded) Megatron tensor built from HF tensors."""
        L = self.layout
        hf = self.hf_names_for(megatron_name, layer_offset)
        tensors = [get_hf(n) for n in hf]
        kind = self.tp_kind(megatron_name)
        if megatron_name.endswith("self_attention.linear_qkv.weight") or megatron_name.endswith(
            "self_attention.linear_qkv.bias"
        ):
            q, k, v = tensors
            rest = (L.hidden_size,) if megatron_name.endswith(".weight") else ()
            self._expect(hf[0], q, (L.num_attention_heads * L.head_dim,), rest)
            self._expect(hf[1], k, (L.num_query_groups * L.head_dim,), rest)
            self._expect(hf[2], v, (L.num_query_groups * L.head_dim,), rest)
            ng = L.num_query_groups
            fused = _cat(
                [
                    q.reshape(ng, L.heads_per_group * L.head_dim, *rest),
                    k.reshape(ng, L.head_dim, *rest),
                    v.reshape(ng, L.head_dim, *rest),
                ],
                dim=1,
            )
            return fused.reshape(-1, *rest)
        if kind == GATED_FC1:
            gate, up = tensors
            self._expect(hf[0], gate, (L.ffn_hidden_size, L.hidden_size))
            self._expect(hf[1], up, (L.ffn_hidden_size, L.hidden_size))
            return _cat([gate, up], dim=0)
        (t,) = tensors
        if kind == ROW:
            inner = L.num_attention_heads * L.head_dim if "linear_proj" in megatron_name else L.ffn_hidden_size
            self._expect(hf[0], t, (L.hidden_size, inner))
        elif kind == REPLICATED:
            n = L.head_dim if megatron_name.endswith(("q_layernorm.weight", "k_layernorm.weight")) else L.hidden_size
            self._expect(hf[0], t, (n,))
        if kind == VOCAB:
            self._expect(hf[0], t, (L.vocab_size, L.hidden_size))
            if L.padded_vocab_size > L.vocab_size:
                pad = t.new_zeros(L.padded_vocab_size - L.vocab_size, t.shape[1])
                t = _cat([t, pad], dim=0)
            return t
        return t

    def hf_to_megatron_shard(
        self,
        megatron_name: str,
        get_hf: HFGetter,
        tp_rank: int,
        tp_size: int,
        layer_offset: int = 0,
    ) -> torch.Tensor:
        """This TP rank's shard of one Megatron parameter, read from HF tensors."""
        full = self.hf_to_megatron_full(megatron_name, get_hf, layer_offset)
        return self.split_for_tp(megatron_name, full, tp_rank, tp_size).contiguous()

    def megatron_full_to_hf(
        self, megatron_name: str, full: torch.Tensor, layer_offset: int = 0
    ) -> list[tuple[str, torch.Tensor]]:
        """HF (name, tensor) pairs for one full Megatron parameter ([] for a tied output layer)."""
        L = self.layout
        if megatron_name == "output_layer.weight" and L.tie_word_embeddings:
            return []
        hf = self.hf_names_for(megatron_name, layer_offset)
        kind = self.tp_kind(megatron_name)
        if len(hf) == 3:  # fused qkv weight or bias
            ng, rest = L.num_query_groups, tuple(full.shape[1:])
            hpg, d = L.heads_per_group, L.head_dim
            if full.shape[0] != ng * (hpg + 2) * d:
                raise ValueError(f"{megatron_name}: shape {tuple(full.shape)} does not match layout")
            grouped = full.reshape(ng, (hpg + 2) * d, *rest)
            q, k, v = grouped.split([hpg * d, d, d], dim=1)
            return [
                (hf[0], q.reshape(-1, *rest).contiguous()),
                (hf[1], k.reshape(-1, *rest).contiguous()),
                (hf[2], v.reshape(-1, *rest).contiguous()),
            ]
        if kind == GATED_FC1:
            gate, up = full.chunk(2, dim=0)
            return [(hf[0], gate.contiguous()), (hf[1], up.contiguous())]
        if kind == VOCAB:
            return [(hf[0], full[: L.vocab_size].contiguous())]
        return [(hf[0], full)]

    @staticmethod
    def _expect(hf_name: str, t: torch.Tensor, lead: tuple, rest: tuple | torch.Size = ()) -> None:
        want = tuple(lead) + tuple(rest)
        if tuple(t.shape) != want:
            raise ValueError(f"HF tensor {hf_name!r} has shape {tuple(t.shape)}, expected {want}")


def _cat(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    import torch

    return torch.cat(tensors, dim=dim)


def _chunk(name: str, t: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    if t.shape[dim] % size:
        raise ValueError(f"{name}: dim {dim} of size {t.shape[dim]} is not divisible by tp={size}")
    return t.chunk(size, dim=dim)[rank]


# ------------------------------------------------------------------ Qwen2 config
def _moe_options(hf_config) -> list[str]:
    found = []
    for attr in ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size"):
        val = getattr(hf_config, attr, None)
        if val:
            found.append(f"{attr}={val}")
    return found


def check_common_llama_like(hf_config) -> None:
    """Reject options of llama-family configs that the Megatron model cannot represent."""
    moe = _moe_options(hf_config)
    if moe:
        raise ValueError(f"unsupported option (MoE): {', '.join(moe)}")
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported option hidden_act={act!r} (only silu/SwiGLU)")
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise ValueError(f"unsupported option layer_types={sorted(set(layer_types))} (sliding window)")
    if getattr(hf_config, "use_sliding_window", False):
        n = hf_config.num_hidden_layers
        if getattr(hf_config, "sliding_window", None) and getattr(hf_config, "max_window_layers", n) < n:
            raise ValueError("unsupported option use_sliding_window=True (sliding window attention)")
    read_rope_theta(hf_config)  # raises on rope scaling


def layout_from_hf(hf_config, *, tp: int, qkv_bias: bool, qk_norm: bool) -> DecoderLayout:
    """DecoderLayout from a llama-family HF config; vocab padded to a multiple of 128*tp."""
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    return DecoderLayout(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        num_attention_heads=heads,
        num_query_groups=getattr(hf_config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        ffn_hidden_size=hf_config.intermediate_size,
        vocab_size=hf_config.vocab_size,
        padded_vocab_size=pad_vocab_size(hf_config.vocab_size, tp),
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        qk_norm=qk_norm,
    )


def validate_qwen2_config(hf_config) -> None:
    """Raise ValueError naming the first unsupported option of a Qwen2 config."""
    check_common_llama_like(hf_config)


def qwen2_layout(hf_config, *, tp: int) -> DecoderLayout:
    """Validated :class:`DecoderLayout` for a Qwen2ForCausalLM config (qkv bias, no qk norm)."""
    validate_qwen2_config(hf_config)
    return layout_from_hf(hf_config, tp=tp, qkv_bias=True, qk_norm=False)
