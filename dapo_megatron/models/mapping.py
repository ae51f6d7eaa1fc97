"""HF <-> Megatron tensors of one model, read off its family's table (:mod:`.decoder`).

Pure tensor/name manipulation (no torch.distributed, no megatron import), serving HF -> Megatron
loading for any TP rank and PP stage (``layer_offset`` = global index of the stage's first
layer), Megatron -> HF export and the per-step weight sync, one parameter at a time.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from dapo_megatron.models.decoder import (
    FAMILIES,
    GATE_UP,
    LAYER,
    MEGATRON_LAYER,
    POST,
    PRE,
    QKV,
    REPLICATED,
    ROW,
    VOCAB,
    DecoderLayout,
    ParamRow,
    divisibility_problems,
    get_layout,
)

__all__ = ["DecoderMapping", "HFGetter", "get_mapping"]

HFGetter = Callable[[str], torch.Tensor]
"""Returns the full HF tensor for an HF parameter name (raises KeyError if absent)."""

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


class DecoderMapping:
    """Name/layout mapping between a Megatron GPTModel and an HF model, read off the family's table."""

    def __init__(self, layout: DecoderLayout):
        self.layout = layout
        self._index = FAMILIES[layout.family].index

    # ------------------------------------------------------------------ names
    def _row(self, megatron_name: str, layer_offset: int = 0) -> tuple[ParamRow, int]:
        """-> (the row, the global layer index or 0 for a row outside the layers)."""
        m = _LAYER_RE.match(megatron_name)
        key, layer = (MEGATRON_LAYER + m.group(2), int(m.group(1)) + layer_offset) if m else (megatron_name, 0)
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
            return torch.cat([_chunk(megatron_name, p, 0, tp_rank, tp_size) for p in parts], dim=0)
        return _chunk(megatron_name, full, 1 if row.split == ROW else 0, tp_rank, tp_size)

    def merge_tp_shards(self, megatron_name: str, shards: list[torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`split_for_tp`: rebuild the full tensor from all TP shards."""
        row = self._row(megatron_name)[0]
        if row.split == REPLICATED or len(shards) == 1:
            return shards[0]
        self._check_tp(megatron_name, row, len(shards))
        if row.split == GATE_UP:
            pieces = [s.chunk(len(row.hf), dim=0) for s in shards]
            return torch.cat([p[j] for j in range(len(row.hf)) for p in pieces], dim=0)
        return torch.cat(shards, dim=1 if row.split == ROW else 0)

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
            return torch.cat(parts, dim=1).reshape(-1, *rest)
        if row.split == VOCAB and L.padded_vocab_size > L.vocab_size:
            (t,) = tensors
            return torch.cat([t, t.new_zeros(L.padded_vocab_size - L.vocab_size, *t.shape[1:])], dim=0)
        return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)

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


def _chunk(name: str, t: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    if t.shape[dim] % size:
        raise ValueError(f"{name}: dim {dim} of size {t.shape[dim]} is not divisible by tp={size}")
    return t.chunk(size, dim=dim)[rank]


def get_mapping(hf_config, *, tp: int = 1) -> DecoderMapping:
    """The Megatron <-> HF mapping for an HF config at tensor-parallel size ``tp``."""
    return DecoderMapping(get_layout(hf_config, tp=tp))
