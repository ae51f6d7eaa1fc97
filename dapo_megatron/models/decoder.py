"""The llama-template decoder: one declarative parameter table per model family, one interpreter.

A family (``qwen2.py``, ``llama.py``, ``qwen3.py``) is a :class:`DecoderFamily`: its HF
``model_type`` and architecture, the config options it refuses, and its table, one
:class:`ParamRow` per parameter (Megatron name, HF name(s), TP split, HF shapes).  Everything
else is derived here from the table: the names both ways, the TP split/merge rules, the
HF <-> Megatron conversion, the expected HF shapes (converter), the parameter counts (the
planner's memory and FLOPs), the TP/PP divisibility checks (planner, converter, actor), the
Megatron flags (qkv bias, q/k norm) and the inference engine's packed modules.  A family that
fits the template is one new file calling :func:`register`.

Pure tensor/name manipulation (no torch.distributed, no megatron import), serving HF -> Megatron
loading for any TP rank and PP stage (``layer_offset`` = global index of the stage's first
layer), Megatron -> HF export and the per-step weight sync, one parameter at a time.

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
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily: the planner reads layouts without paying for torch
    import torch

HFGetter = Callable[[str], "torch.Tensor"]
"""Returns the full HF tensor for an HF parameter name (raises KeyError if absent)."""

REPLICATED, COLUMN, ROW, VOCAB, QKV, GATE_UP = "replicated", "column", "row", "vocab", "qkv", "gate_up"
PRE, LAYER, POST = "pre", "layer", "post"  # the pipeline stage holding a row: first, every, last
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


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
_M, _H = "decoder.layers.{i}.", "model.layers.{i}."
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


class DecoderMapping:
    """Name/layout mapping between a Megatron GPTModel and an HF model, read off the family's table."""

    def __init__(self, layout: DecoderLayout):
        self.layout = layout
        self._index = FAMILIES[layout.family].index

    # ------------------------------------------------------------------ names
    def _row(self, megatron_name: str, layer_offset: int = 0) -> tuple[ParamRow, int]:
        """-> (the row, the global layer index or 0 for a row outside the layers)."""
        m = _LAYER_RE.match(megatron_name)
        key, layer = (_M + m.group(2), int(m.group(1)) + layer_offset) if m else (megatron_name, 0)
        row = self._index.get(key)
        if row is None:
            raise KeyError(f"no HF mapping for Megatron parameter {megatron_name!r}")
        if m and not 0 <= layer < self.layout.num_layers:
            raise KeyError(
                f"{megatron_name!r} with layer_offset={layer_offset} is global layer {layer}, "
                f"outside [0, {self.layout.num_layers})"
            )
        return row, layer

    def hf_names_for(self, megatron_name: str, layer_offset: int = 0) -> list[str]:
        """HF tensor names that make up one Megatron parameter (in concatenation order)."""
        row, layer = self._row(megatron_name, layer_offset)
        if not self.layout.in_hf(row):
            return [row.tied_to]
        return [n.format(i=layer) for n in row.hf]

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
        count = L.num_layers if layers is None else len(layers)
        rows = L.rows
        names = [r.megatron for r in rows if r.stage == PRE] if pre_process else []
        layer = [(r.te_name if te_names and r.te_name else r.megatron) for r in rows if r.stage == LAYER]
        for i in range(count):
            names += [n.format(i=i) for n in layer]
        if post_process:
            names += [r.megatron for r in rows if r.stage == POST and (L.in_hf(r) or include_tied_output)]
        return names

    def tied_aliases(self) -> dict[str, str]:
        """HF names an inference engine keeps for a tensor the checkpoint stores once: alias -> source.

        A tied model's HF checkpoint has no ``lm_head.weight``, but vLLM builds the LM head as
        its own layer with its own post-load processing (on CPU, a repacked GEMM kernel), so
        an update that only reaches the embedding leaves the head's kernel on the old
        weights.  Weight sync sends the embedding a second time under this name, through
        the head's own loader.
        """
        return {r.hf[0]: r.tied_to for r in self.layout.rows if not self.layout.in_hf(r)}

    def hf_names(self) -> list[str]:
        """All HF parameter names of the full model (the export set)."""
        return [n for name in self.megatron_names() for n in self.hf_names_for(name)]

    # ------------------------------------------------------------ TP rules
    def tp_kind(self, megatron_name: str) -> str:
        """TP split kind of a parameter: replicated, column, row, vocab, qkv or gate_up."""
        return self._row(megatron_name)[0].split

    def partition_dim(self, megatron_name: str) -> int | None:
        """Dimension along which the parameter is TP-sharded (None = replicated)."""
        return {REPLICATED: None, ROW: 1}.get(self.tp_kind(megatron_name), 0)

    def _check_tp(self, megatron_name: str, row: ParamRow, tp_size: int) -> None:
        problems = divisibility_problems(self.layout, tp=tp_size, rows=(row,))
        if problems:
            raise ValueError(f"{megatron_name}: {problems[0]}")

    def split_for_tp(self, megatron_name: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
        """The ``tp_rank``-th TP shard of a full (unsharded, padded) Megatron tensor."""
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank={tp_rank} outside [0, {tp_size})")
        row = self._row(megatron_name)[0]
        if row.split == REPLICATED or tp_size == 1:
            return full
        self._check_tp(megatron_name, row, tp_size)
        if row.split == GATE_UP:
            parts = full.chunk(len(row.hf), dim=0)
            return _cat([_chunk(megatron_name, p, 0, tp_rank, tp_size) for p in parts], dim=0)
        return _chunk(megatron_name, full, 1 if row.split == ROW else 0, tp_rank, tp_size)

    def merge_tp_shards(self, megatron_name: str, shards: list[torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`split_for_tp`: rebuild the full tensor from all TP shards."""
        row = self._row(megatron_name)[0]
        if row.split == REPLICATED or len(shards) == 1:
            return shards[0]
        self._check_tp(megatron_name, row, len(shards))
        if row.split == GATE_UP:
            pieces = [s.chunk(len(row.hf), dim=0) for s in shards]
            return _cat([p[j] for j in range(len(row.hf)) for p in pieces], dim=0)
        return _cat(shards, dim=1 if row.split == ROW else 0)

    # ----------------------------------------------------------- HF <-> Megatron
    def hf_to_megatron_full(self, megatron_name: str, get_hf: HFGetter, layer_offset: int = 0) -> torch.Tensor:
        """Full (unsharded; vocab-padded) Megatron tensor built from HF tensors."""
        L = self.layout
        row = self._row(megatron_name, layer_offset)[0]
        hf = self.hf_names_for(megatron_name, layer_offset)
        tensors = [get_hf(n) for n in hf]
        for name, t, spec in zip(hf, tensors, row.shapes, strict=True):
            if tuple(t.shape) != L.shape(spec):
                raise ValueError(f"HF tensor {name!r} has shape {tuple(t.shape)}, expected {L.shape(spec)}")
        if row.split == QKV:
            q, k, v = tensors
            ng, rest = L.num_query_groups, tuple(q.shape[1:])
            parts = [q.reshape(ng, -1, *rest), k.reshape(ng, -1, *rest), v.reshape(ng, -1, *rest)]
            return _cat(parts, dim=1).reshape(-1, *rest)
        if row.split == VOCAB and L.padded_vocab_size > L.vocab_size:
            (t,) = tensors
            return _cat([t, t.new_zeros(L.padded_vocab_size - L.vocab_size, *t.shape[1:])], dim=0)
        return tensors[0] if len(tensors) == 1 else _cat(tensors, dim=0)

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
        row = self._row(megatron_name, layer_offset)[0]
        if not L.in_hf(row):
            return []
        hf = self.hf_names_for(megatron_name, layer_offset)
        if row.split == QKV:
            ng, rest = L.num_query_groups, tuple(full.shape[1:])
            hpg, d = L.num_attention_heads // ng, L.head_dim
            if full.shape[0] != ng * (hpg + 2) * d:
                raise ValueError(f"{megatron_name}: shape {tuple(full.shape)} does not match layout")
            parts = full.reshape(ng, (hpg + 2) * d, *rest).split([hpg * d, d, d], dim=1)
            return [(n, p.reshape(-1, *rest).contiguous()) for n, p in zip(hf, parts, strict=True)]
        if row.split == VOCAB:
            return [(hf[0], full[: L.vocab_size].contiguous())]
        if len(hf) > 1:
            parts = full.split([L.shape(s)[0] for s in row.shapes], dim=0)
            return [(n, p.contiguous()) for n, p in zip(hf, parts, strict=True)]
        return [(hf[0], full)]


def _cat(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    import torch  # keeps the planner's `import dapo_megatron.models` free of torch

    return torch.cat(tensors, dim=dim)


def _chunk(name: str, t: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    if t.shape[dim] % size:
        raise ValueError(f"{name}: dim {dim} of size {t.shape[dim]} is not divisible by tp={size}")
    return t.chunk(size, dim=dim)[rank]


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


def get_mapping(hf_config, *, tp: int = 1) -> DecoderMapping:
    """The Megatron <-> HF mapping for an HF config at tensor-parallel size ``tp``."""
    return DecoderMapping(get_layout(hf_config, tp=tp))
