"""Which slice of every HF tensor one vLLM TP rank holds, read off the engine's own layers.

Runs inside the vLLM worker (through ``collective_rpc``).  The answer drives two things:

* the cross-stage transfer (:mod:`.gather`): with the actor split into pipeline stages, a
  rank receives from the owning stage only the slice its engine keeps;
* verification (:mod:`.verify`): the checksum of exactly that slice, engine vs actor.

The rules mirror vLLM's weight loaders (``vllm/model_executor/layers/linear.py`` and
``vocab_parallel_embedding.py``, vllm 0.32), which take the full HF tensor and narrow it:

* ``QKVParallelLinear``: q rows ``[tp_rank * nq_local * d, +nq_local * d)``; k and v rows
  ``[kv_rank * nkv_local * d, ...)`` with ``kv_rank = tp_rank // num_kv_head_replicas``
  (KV heads are replicated when engine TP > number of KV heads); the engine parameter is
  ``[q; k; v]`` of those;
* ``MergedColumnParallelLinear`` (gate_up): each part's ``output_size / tp`` rows at ``tp_rank``;
* ``ColumnParallelLinear``: ``output_size_per_partition`` rows; ``RowParallelLinear``: weight
  columns ``input_size_per_partition`` at ``tp_rank``, bias whole;
* ``VocabParallelEmbedding`` / ``ParallelLMHead``: rows ``[org_vocab_start_index, +num_org_elements)``
  (the engine pads its shard; the padding is not part of the HF tensor);
* everything else (norms, ``ReplicatedLinear``): the whole tensor.

A rule that disagreed with the loader could not go unnoticed: received slices are placed
in NaN-filled full tensors (:func:`.slices.nan_placeholder`), and verification checksums
the engine's tensors split by these same rules, checking the split covers each parameter.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from dapo_megatron.models import packed_modules
from dapo_megatron.weight_sync.slices import WHOLE, TensorSlice

__all__ = ["EnginePart", "engine_parts", "engine_slices"]


@dataclass(frozen=True)
class EnginePart:
    """HF tensor ``hf_name``'s slice ``part`` lives in engine parameter ``engine_param`` at ``local_start``."""

    hf_name: str
    engine_param: str
    leaf: str  # "weight" / "bias": the attribute of the module
    part: TensorSlice
    local_start: int  # offset of the slice inside the engine parameter along part.dim
    padded: bool = False  # the engine parameter has rows beyond the slice (vocab padding)


def engine_parts(vllm_model: torch.nn.Module) -> Iterator[tuple[torch.nn.Module, list[EnginePart]]]:
    """Per module with parameters of its own: the HF slices its parameters hold, in engine layout order."""
    # optional dependency: vLLM (runs in the engine's worker; the module imports without it)
    from vllm.model_executor.layers.linear import (
        ColumnParallelLinear,
        LinearBase,
        MergedColumnParallelLinear,
        QKVParallelLinear,
        RowParallelLinear,
    )
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    # the model's own packing, over the defaults the parameter tables declare
    packed = packed_modules() | dict(getattr(vllm_model, "packed_modules_mapping", {}) or {})

    def hf_parts(module_name: str, leaf: str) -> list[str]:
        prefix, _, last = module_name.rpartition(".")
        names = packed.get(last, [last])
        return [f"{prefix}.{n}.{leaf}" if prefix else f"{n}.{leaf}" for n in names]

    def stacked(mname: str, leaf: str, sizes: list[int], starts: list[int]) -> list[EnginePart]:
        out, local = [], 0
        for name, size, start in zip(hf_parts(mname, leaf), sizes, starts, strict=True):
            out.append(EnginePart(name, f"{mname}.{leaf}", leaf, TensorSlice(0, start, size), local))
            local += size
        return out

    for mname, module in vllm_model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if not own:
            continue
        parts: list[EnginePart] = []
        if isinstance(module, LinearBase):
            tp_rank = int(getattr(module, "tp_rank", 0))
            tp_size = int(getattr(module, "tp_size", 1))
            leaves = ["weight"] + (["bias"] if getattr(module, "bias", None) is not None else [])
            for leaf in leaves:
                pname = f"{mname}.{leaf}"
                if isinstance(module, QKVParallelLinear):
                    d = module.head_size
                    dv = int(getattr(module, "v_head_size", d))
                    sizes = [module.num_heads * d, module.num_kv_heads * d, module.num_kv_heads * dv]
                    kv_rank = tp_rank // module.num_kv_head_replicas
                    parts += stacked(mname, leaf, sizes, [tp_rank * sizes[0], kv_rank * sizes[1], kv_rank * sizes[2]])
                elif isinstance(module, MergedColumnParallelLinear):
                    sizes = [s // tp_size for s in module.output_sizes]
                    parts += stacked(mname, leaf, sizes, [tp_rank * s for s in sizes])
                elif isinstance(module, ColumnParallelLinear):
                    n = int(module.output_size_per_partition)
                    parts.append(EnginePart(hf_parts(mname, leaf)[0], pname, leaf, TensorSlice(0, tp_rank * n, n), 0))
                elif isinstance(module, RowParallelLinear) and leaf == "weight":
                    n = int(module.input_size_per_partition)
                    parts.append(EnginePart(hf_parts(mname, leaf)[0], pname, leaf, TensorSlice(1, tp_rank * n, n), 0))
                else:  # ReplicatedLinear, a row-parallel bias
                    parts.append(EnginePart(hf_parts(mname, leaf)[0], pname, leaf, WHOLE, 0))
        elif isinstance(module, VocabParallelEmbedding):
            if set(own) != {"weight"}:
                raise ValueError(
                    f"{mname}: unsupported vocab-parallel parameters {sorted(own)}; weight sync maps only 'weight'"
                )
            idx = module.shard_indices
            part = TensorSlice(0, int(idx.org_vocab_start_index), int(idx.num_org_elements))
            parts.append(EnginePart(f"{mname}.weight", f"{mname}.weight", "weight", part, 0, padded=True))
        else:
            for leaf in own:
                parts.append(EnginePart(f"{mname}.{leaf}", f"{mname}.{leaf}", leaf, WHOLE, 0))
        yield module, parts


def engine_slices(vllm_model: torch.nn.Module) -> dict[str, TensorSlice]:
    """HF name -> the slice of that tensor this engine rank needs (runs in the worker; no data read)."""
    out: dict[str, TensorSlice] = {}
    owner: dict[str, str] = {}
    for _module, parts in engine_parts(vllm_model):
        for p in parts:
            if p.hf_name in out:
                raise RuntimeError(f"engine tensor for {p.hf_name!r} seen twice ({owner[p.hf_name]}, {p.engine_param})")
            out[p.hf_name] = p.part
            owner[p.hf_name] = p.engine_param
    return out
