"""Verification mode: prove that the engine holds exactly the actor's weights.

Weights are read back from *inside* the engine, after loading and after vLLM's own
post-processing, so the check covers the transport, vLLM's fused layouts (qkv_proj =
[q; k; v], gate_up_proj = [gate; up]) and its TP sharding.  On CPU vLLM repacks Linear
weights for oneDNN and empties ``layer.weight``; there the effective weight is read by
running the layer's own GEMM on identity rows (``e_k @ W^T`` is column ``k`` of ``W``,
exact in any float dtype because every other product is an exact zero).

The engine side (:func:`engine_checksums`, runs in the vLLM worker) describes, per HF
tensor name, which slice of the full HF tensor its rank holds and the checksum of that
slice; the actor side (:func:`compare_checksums`) computes the checksum of the same slice
of the actor's tensor and raises :class:`WeightMismatchError` naming every tensor that
differs.  A checksum is (sum, sum of |x|, position-weighted sum) in float64: the weighted
sum catches permutations and swapped halves that plain sums miss.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

__all__ = [
    "ShardChecksum",
    "WeightMismatchError",
    "tensor_checksum",
    "engine_checksums",
    "compare_checksums",
    "effective_linear_weight",
]

# relative tolerance on the float64 sums (the values compared are bit-identical when
# the sync is right; summation order is the same contiguous row-major order)
RTOL = 1e-7


class WeightMismatchError(RuntimeError):
    """The engine's weights differ from the actor's (names every offending tensor)."""


@dataclass(frozen=True)
class ShardChecksum:
    """The slice ``full.narrow(dim, start, length)`` of one HF tensor held by an engine rank."""

    hf_name: str
    engine_param: str
    dim: int | None  # None: the whole tensor
    start: int
    length: int
    checksum: tuple[float, float, float]
    dtype: str


def tensor_checksum(t: torch.Tensor) -> tuple[float, float, float]:
    """(sum, sum|x|, sum x_i * w_i) in float64 with fixed pseudo-random weights w_i in [-0.5, 0.5)."""
    x = t.detach().reshape(-1).to(torch.float64)
    idx = torch.arange(x.numel(), dtype=torch.int64, device=x.device)
    w = ((idx * 2654435761) % 4096).to(torch.float64) / 4096.0 - 0.5
    return (float(x.sum()), float(x.abs().sum()), float((x * w).sum()))


def _close(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    scale = max(abs(a[1]), abs(b[1]), 1e-30)
    return all(abs(x - y) <= RTOL * scale for x, y in zip(a, b, strict=True))


def effective_linear_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The ``[out, in]`` weight a vLLM linear layer multiplies with, even when repacked on CPU."""
    w = layer.weight
    if w.numel() > 0:
        return w.detach()
    probe = getattr(layer, "cpu_linear", None)
    if probe is None:
        raise RuntimeError(f"{type(layer).__name__}: weight is empty and there is no cpu_linear kernel to probe")
    k = int(layer.input_size_per_partition)
    cols = []
    step = 1024
    with torch.no_grad():
        for a in range(0, k, step):
            b = min(a + step, k)
            eye = torch.zeros(b - a, k, dtype=layer.params_dtype)
            eye[torch.arange(b - a), torch.arange(a, b)] = 1
            cols.append(probe(eye, w, None))  # [b-a, out] = W[:, a:b]^T
    return torch.cat(cols, dim=0).t().contiguous()


def _packed_names(vllm_model: torch.nn.Module) -> dict[str, list[str]]:
    mapping = dict(getattr(vllm_model, "packed_modules_mapping", {}) or {})
    mapping.setdefault("qkv_proj", ["q_proj", "k_proj", "v_proj"])
    mapping.setdefault("gate_up_proj", ["gate_proj", "up_proj"])
    return mapping


def engine_checksums(vllm_model: torch.nn.Module) -> dict[str, ShardChecksum]:
    """Checksums of every weight of this engine rank, keyed by the HF tensor name (runs in the worker)."""
    from vllm.model_executor.layers.linear import (
        ColumnParallelLinear,
        LinearBase,
        MergedColumnParallelLinear,
        QKVParallelLinear,
        RowParallelLinear,
    )
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    packed = _packed_names(vllm_model)
    out: dict[str, ShardChecksum] = {}

    def add(hf_name, engine_param, t, dim, start):
        length = t.shape[dim] if dim is not None else 0
        if hf_name in out:
            raise RuntimeError(
                f"engine tensor for {hf_name!r} seen twice ({out[hf_name].engine_param}, {engine_param})"
            )
        out[hf_name] = ShardChecksum(hf_name, engine_param, dim, start, length, tensor_checksum(t), str(t.dtype))

    def hf_parts(module_name: str, leaf: str) -> list[str]:
        prefix, _, last = module_name.rpartition(".")
        names = packed.get(last, [last])
        return [f"{prefix}.{n}.{leaf}" if prefix else f"{n}.{leaf}" for n in names]

    with torch.no_grad():
        for mname, module in vllm_model.named_modules():
            own = dict(module.named_parameters(recurse=False))
            if not own:
                continue
            if isinstance(module, LinearBase):
                tp_rank = int(getattr(module, "tp_rank", 0))
                weight = effective_linear_weight(module)
                tensors = {"weight": weight}
                if getattr(module, "bias", None) is not None:
                    tensors["bias"] = module.bias.detach()
                for leaf, t in tensors.items():
                    pname = f"{mname}.{leaf}"
                    if isinstance(module, QKVParallelLinear):
                        d = module.head_size
                        sizes = [module.num_heads * d, module.num_kv_heads * d, module.num_kv_heads * d]
                        kv_rank = tp_rank // module.num_kv_head_replicas
                        starts = [tp_rank * sizes[0], kv_rank * sizes[1], kv_rank * sizes[2]]
                        for name, part, s in zip(hf_parts(mname, leaf), t.split(sizes, dim=0), starts, strict=True):
                            add(name, pname, part, 0, s)
                    elif isinstance(module, MergedColumnParallelLinear):
                        sizes = [s // module.tp_size for s in module.output_sizes]
                        for name, part, size in zip(hf_parts(mname, leaf), t.split(sizes, dim=0), sizes, strict=True):
                            add(name, pname, part, 0, tp_rank * size)
                    elif isinstance(module, ColumnParallelLinear):
                        add(hf_parts(mname, leaf)[0], pname, t, 0, tp_rank * t.shape[0])
                    elif isinstance(module, RowParallelLinear):
                        if leaf == "bias":
                            add(hf_parts(mname, leaf)[0], pname, t, None, 0)
                        else:
                            add(hf_parts(mname, leaf)[0], pname, t, 1, tp_rank * t.shape[1])
                    else:  # ReplicatedLinear
                        add(hf_parts(mname, leaf)[0], pname, t, None, 0)
            elif isinstance(module, VocabParallelEmbedding):
                idx = module.shard_indices
                rows = module.weight.detach()[: idx.num_org_elements]
                add(f"{mname}.weight", f"{mname}.weight", rows, 0, idx.org_vocab_start_index)
            else:
                for leaf, p in own.items():
                    add(f"{mname}.{leaf}", f"{mname}.{leaf}", p.detach(), None, 0)
    return out


def compare_checksums(
    engine: Mapping[str, ShardChecksum],
    actor_weights: Iterable[tuple[str, torch.Tensor]],
    *,
    rank_desc: str = "",
) -> int:
    """Check every engine shard against the actor's tensors; returns the number of tensors checked.

    ``actor_weights`` yields full HF tensors already cast to the engine dtype.

    Raises:
        WeightMismatchError: naming each tensor whose checksum differs, each tensor the
            engine holds that the actor did not produce, and each actor tensor the engine lacks.
    """
    problems: list[str] = []
    seen: set[str] = set()
    for name, full in actor_weights:
        seen.add(name)
        shard = engine.get(name)
        if shard is None:
            problems.append(f"{name}: produced by the actor but not held by the engine")
            continue
        piece = full if shard.dim is None else full.narrow(shard.dim, shard.start, shard.length)
        want = tensor_checksum(piece)
        if not _close(want, shard.checksum):
            problems.append(
                f"{name} (engine {shard.engine_param}, dim={shard.dim} start={shard.start} len={shard.length}): "
                f"actor checksum {want} != engine {shard.checksum}"
            )
    for name in sorted(set(engine) - seen):
        problems.append(f"{name}: held by the engine ({engine[name].engine_param}) but not produced by the actor")
    if problems:
        where = f" on {rank_desc}" if rank_desc else ""
        raise WeightMismatchError(
            f"weight verification failed{where} for {len(problems)} tensor(s):\n  " + "\n  ".join(problems)
        )
    return len(seen)
