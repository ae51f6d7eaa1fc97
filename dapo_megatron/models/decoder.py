"""The llama-template decoder: one declarative parameter table per model family, one interpreter.

A family (``qwen2.py``, ``llama.py``, ``qwen3.py``) is a :class:`DecoderFamily`: its HF
``model_type`` and architecture, the config options it refuses, and its table, one
:class:`ParamRow` per parameter (Megatron name, HF name(s), TP split, HF shapes).  Everything
else is derived from the table: here the expected HF shapes (converter), the parameter counts
(the planner's memory and FLOPs), the TP/PP divisibility checks (planner, converter, actor), the
Megatron flags (qkv bias, q/k norm) and the inference engine's packed modules; in
:mod:`.mapping` (apart: it imports torch, and the planner reads layouts without it) the names
both ways, the TP split/merge rules and the HF <-> Megatron conversion.  A family that fits the
template is one new file calling :func:`register`.

Names are templates: ``{i}`` is the layer index, PP-stage-local on the Megatron side
(``decoder.layers.{i}.``), global on the HF side.  Shapes are written in dimension symbols
(:meth:`DecoderLayout.dims`): ``H`` hidden, ``F`` FFN, ``V`` vocabulary, ``D`` head dim,
``Q`` = heads x D, ``KV`` = KV groups x D.  Split kinds:

* ``replicated``: every TP rank holds it whole (norms);
* ``column`` / ``row``: one HF tensor split on dim 0 / dim 1 (``row``: attention output, FC2);
* ``vocab``: dim 0, after padding the rows to a multiple of ``128 * tp`` (zero on import,
  dropped on export; padded logits are 0, not -inf: slice to ``vocab_size`` before a softmax);
* ``qkv``: fused q/k/v interleaved per KV group ``g``: ``[q heads of g, k_g, v_g]``, so TP rank
  r owns whole KV groups, the r-th contiguous chunk of the fused tensor;
* ``gate_up``: ``[gate; up]``, each part split on dim 0, the rank's pieces concatenated.

With the Transformer-Engine spec the two pre-norms are fused into the following linear and
named ``...linear_qkv.layer_norm_weight`` / ``...mlp.linear_fc1.layer_norm_weight`` (a row's
``te_name``); both spellings are accepted everywhere.  Tied embeddings: HF has no
``lm_head.weight``; Megatron has no ``output_layer.weight`` at PP=1 but the last PP stage holds
a copy when PP>1; it is loaded from the row's ``tied_to`` tensor and skipped on export.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

REPLICATED, COLUMN, ROW, VOCAB, QKV, GATE_UP = "replicated", "column", "row", "vocab", "qkv", "gate_up"
PRE, LAYER, POST = "pre", "layer", "post"  # the pipeline stage holding a row: first, every, last
MEGATRON_LAYER = "decoder.layers.{i}."  # a layer row's Megatron name prefix


@dataclass(frozen=True)
class ParamRow:
    """One Megatron parameter and the HF tensor(s) it is made of (concatenated in ``hf`` order)."""

    megatron: str
    hf: tuple[str, ...]
    split: str  # replicated, column, row, vocab, qkv or gate_up
    shapes: tuple[str, ...]  # each HF tensor's shape in dimension symbols, e.g. "Q H"
    te_name: str | None = None  # the Transformer-Engine spec's name (a norm fused into a linear)
    tied_to: str | None = None  # the HF tensor it is when tie_word_embeddings (lm_head -> embedding)
    engine: str | None = None  # the vLLM module packing the HF tensors (qkv_proj, gate_up_proj)

    @property
    def stage(self) -> str:
        if "{i}" in self.megatron:
            return LAYER
        return PRE if self.megatron.startswith("embedding.") else POST


# The Megatron GPTModel template: every parameter it can have, under the llama HF names.
_M, _H = MEGATRON_LAYER, "model.layers.{i}."
EMBEDDING = ParamRow("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB, ("V H",))
INPUT_NORM = ParamRow(
    _M + "input_layernorm.weight",
    (_H + "input_layernorm.weight",),
    REPLICATED,
    ("H",),
    te_name=_M + "self_attention.linear_qkv.layer_norm_weight",
)
QKV_WEIGHT = ParamRow(
    _M + "self_attention.linear_qkv.weight",
    tuple(_H + f"self_attn.{x}_proj.weight" for x in "qkv"),
    QKV,
    ("Q H", "KV H", "KV H"),
    engine="qkv_proj",
)
QKV_BIAS = ParamRow(
    _M + "self_attention.linear_qkv.bias", tuple(_H + f"self_attn.{x}_proj.bias" for x in "qkv"), QKV, ("Q", "KV", "KV")
)
Q_NORM = ParamRow(_M + "self_attention.q_layernorm.weight", (_H + "self_attn.q_norm.weight",), REPLICATED, ("D",))
K_NORM = ParamRow(_M + "self_attention.k_layernorm.weight", (_H + "self_attn.k_norm.weight",), REPLICATED, ("D",))
ATTN_PROJ = ParamRow(_M + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",), ROW, ("H Q",))
PRE_MLP_NORM = ParamRow(
    _M + "pre_mlp_layernorm.weight",
    (_H + "post_attention_layernorm.weight",),
    REPLICATED,
    ("H",),
    te_name=_M + "mlp.linear_fc1.layer_norm_weight",
)
FC1 = ParamRow(
    _M + "mlp.linear_fc1.weight",
    (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"),
    GATE_UP,
    ("F H", "F H"),
    engine="gate_up_proj",
)
FC2 = ParamRow(_M + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",), ROW, ("H F",))
FINAL_NORM = ParamRow("decoder.final_layernorm.weight", ("model.norm.weight",), REPLICATED, ("H",))
OUTPUT = ParamRow("output_layer.weight", ("lm_head.weight",), VOCAB, ("V H",), tied_to="model.embed_tokens.weight")


@dataclass(frozen=True)
class DecoderFamily:
    """A model family: its HF identity, the config options it refuses, its parameter table."""

    model_type: str
    architecture: str
    rows: tuple[ParamRow, ...]
    refuses: tuple[tuple[str, str], ...] = ()  # (config option that must be off, why)
    index: dict[str, ParamRow] = field(init=False, repr=False, compare=False)  # Megatron name -> row

    def __post_init__(self) -> None:
        index = {name: row for row in self.rows for name in (row.megatron, row.te_name) if name}
        object.__setattr__(self, "index", index)


FAMILIES: dict[str, DecoderFamily] = {}


def register(family: DecoderFamily) -> DecoderFamily:
    """Make ``family`` known to every consumer (keyed by its HF ``model_type``)."""
    FAMILIES[family.model_type] = family
    return family


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
    """Shapes of one model of a family (everything the table's shape rules need)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int  # the HF vocabulary (unpadded)
    padded_vocab_size: int
    tie_word_embeddings: bool
    family: str = "llama"  # its DecoderFamily in FAMILIES (llama: the template without extras)

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_query_groups}"
            )
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError("padded_vocab_size < vocab_size")

    @property
    def rows(self) -> tuple[ParamRow, ...]:
        return FAMILIES[self.family].rows

    @property
    def qkv_bias(self) -> bool:
        return QKV_BIAS.megatron in FAMILIES[self.family].index

    @property
    def qk_norm(self) -> bool:
        return Q_NORM.megatron in FAMILIES[self.family].index

    @property
    def qkv_rows(self) -> int:
        return (self.num_attention_heads + 2 * self.num_query_groups) * self.head_dim

    def dims(self) -> dict[str, tuple[int, str | None, int]]:
        """Shape symbol -> (size, the HF config field whose units TP splits whole, its value)."""
        d = self.head_dim
        return {
            "H": (self.hidden_size, "hidden_size", self.hidden_size),
            "F": (self.ffn_hidden_size, "intermediate_size", self.ffn_hidden_size),
            "Q": (self.num_attention_heads * d, "num_attention_heads", self.num_attention_heads),
            "KV": (self.num_query_groups * d, "num_key_value_heads", self.num_query_groups),
            "D": (d, "head_dim", d),
            "V": (self.vocab_size, None, 0),  # padded to a multiple of 128 * tp
        }

    def shape(self, spec: str) -> tuple[int, ...]:
        dims = self.dims()
        return tuple(dims[s][0] for s in spec.split())

    def row_params(self, row: ParamRow) -> int:
        return sum(math.prod(self.shape(s)) for s in row.shapes)

    def in_hf(self, row: ParamRow) -> bool:
        """Whether the HF checkpoint stores the row (a tied output layer is the embedding)."""
        return not (row.tied_to and self.tie_word_embeddings)

    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF tensor name -> shape that a checkpoint with this layout must contain."""
        out = {}
        for row in self.rows:
            for i in range(self.num_layers) if row.stage == LAYER else [0]:
                if self.in_hf(row):
                    out.update({n.format(i=i): self.shape(s) for n, s in zip(row.hf, row.shapes, strict=True)})
        return out

    # The counts below are what memory and FLOPs depend on (the planner's arithmetic); they
    # use the HF vocabulary, not the padded one.
    def _params(self, keep: Callable[[ParamRow], bool]) -> int:
        """HF parameters of the rows ``keep`` accepts (a layer row once per layer)."""
        n = self.num_layers
        return sum(self.row_params(r) * (n if r.stage == LAYER else 1) for r in self.rows if keep(r) and self.in_hf(r))

    def layer_sharded_params(self) -> int:
        """Parameters of one layer that tensor parallelism splits (QKV, proj, FC1, FC2, QKV bias)."""
        return sum(self.row_params(r) for r in self.rows if r.stage == LAYER and r.split != REPLICATED)

    def replicated_params(self) -> int:
        return self._params(lambda r: r.split == REPLICATED)

    def total_params(self) -> int:
        """The HF parameter count (unpadded vocabulary)."""
        return self._params(lambda r: True)

    def matmul_params(self) -> int:
        """Parameters that multiply every token: P of ``6 P T``.

        The input embedding is a row lookup, no FLOPs: an untied model counts its output
        layer once, not its embedding too (tied, the one matrix is the output layer).
        """
        out = sum(self.row_params(r) for r in self.rows if r.split == VOCAB and r.stage != PRE)
        return self._params(lambda r: r.split != VOCAB) + out

    def rank_params(self, tp: int, *, layers: int, pre_process: bool, post_process: bool, tied_copy: bool) -> int:
        """Parameters one TP rank of a pipeline stage of ``layers`` layers holds.

        ``tied_copy``: the stage keeps its own output layer although embeddings are tied (the
        last stage when PP > 1).
        """
        n, on = 0, {LAYER: layers, PRE: int(pre_process), POST: int(post_process)}
        for row in self.rows:
            if self.in_hf(row) or tied_copy:
                if row.split == VOCAB:
                    n += on[row.stage] * pad_vocab_size(self.vocab_size, tp) // tp * self.shape(row.shapes[0])[1]
                else:
                    n += on[row.stage] * (self.row_params(row) // (1 if row.split == REPLICATED else tp))
        return n


@dataclass(frozen=True)
class Indivisible:
    """A count the parallel layout must divide and does not."""

    name: str  # the HF config field (num_key_value_heads, num_hidden_layers, ...)
    value: int
    axis: str  # "tp" or "pp"
    size: int

    def __str__(self) -> str:
        return f"{self.name}={self.value} is not divisible by {self.axis}={self.size}"


def divisibility_problems(
    layout: DecoderLayout, *, tp: int = 1, pp: int = 1, rows: tuple[ParamRow, ...] | None = None
) -> list[Indivisible]:
    """Units the table's TP splits cut (whole heads, KV groups, FFN rows) that ``tp`` does not
    divide, then layers that ``pp`` does not divide (``pp=1``: uneven stages are the caller's)."""
    dims, seen, out = layout.dims(), set(), []
    for row in layout.rows if rows is None else rows:
        if row.split == REPLICATED:
            continue
        for spec in row.shapes:
            _, name, units = dims[spec.split()[1 if row.split == ROW else 0]]
            if name and name not in seen and units % tp:
                seen.add(name)
                out.append(Indivisible(name, units, "tp", tp))
    if layout.num_layers % pp:
        out.append(Indivisible("num_hidden_layers", layout.num_layers, "pp", pp))
    return out


def packed_modules() -> dict[str, list[str]]:
    """Engine module -> the HF modules it packs, from every family's tables (vLLM's
    ``packed_modules_mapping`` defaults: ``qkv_proj`` -> q/k/v_proj, ``gate_up_proj``)."""
    out: dict[str, list[str]] = {}
    for family in FAMILIES.values():
        for row in family.rows:
            if row.engine:
                out.setdefault(row.engine, [n.split(".")[-2] for n in row.hf])
    return out


# ------------------------------------------------------------------ HF configs
def model_type_of(hf_config) -> str:
    """Family key (HF ``model_type``) of an HF config; ValueError if unsupported."""
    archs = {f.architecture for f in FAMILIES.values()}
    for arch in getattr(hf_config, "architectures", None) or []:
        if arch not in archs:
            raise ValueError(f"unsupported architecture {arch!r}; supported: {sorted(archs)}")
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {tuple(FAMILIES)}")
    return model_type


def _check_template(hf_config) -> None:
    """Reject options of llama-template configs that the Megatron model cannot represent."""
    moe_options = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")
    moe = [f"{a}={getattr(hf_config, a)}" for a in moe_options if getattr(hf_config, a, None)]
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


def get_layout(hf_config, *, tp: int = 1) -> DecoderLayout:
    """Validated layout of an HF config (its family's refusals checked, vocab padded for ``tp``)."""
    family = FAMILIES[model_type_of(hf_config)]
    _check_template(hf_config)
    for option, why in family.refuses:
        if getattr(hf_config, option, False):
            raise ValueError(f"unsupported option {option}=True" + (f" ({why})" if why else ""))
    heads = hf_config.num_attention_heads
    return DecoderLayout(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        num_attention_heads=heads,
        num_query_groups=getattr(hf_config, "num_key_value_heads", None) or heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
        ffn_hidden_size=hf_config.intermediate_size,
        vocab_size=hf_config.vocab_size,
        padded_vocab_size=pad_vocab_size(hf_config.vocab_size, tp),
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        family=family.model_type,
    )
