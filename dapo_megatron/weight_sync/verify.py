"""Verification mode: prove that the engine holds exactly the actor's weights.

Weights are read back from *inside* the engine, after loading and after vLLM's own
post-processing, so the check covers the transport, vLLM's fused layouts (qkv_proj =
[q; k; v], gate_up_proj = [gate; up]) and its TP sharding.  On CPU vLLM repacks the
weights of linear layers and of the LM head for its GEMM kernels; there the effective
weight is read by running the layer's own kernel on identity rows (``e_k @ W^T`` is
column ``k`` of ``W``, exact in any float dtype because every other product is an exact
zero).  A tied LM head is checked as its own tensor (``lm_head.weight``) against the
embedding: the engine computes with two copies, so both must be right.

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

from dapo_megatron.weight_sync.engine_layout import engine_parts

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


# Elements per checksum chunk: each float64/int64 temporary is at most 32 MiB, so a 32B model's
# embedding (778M elements) never needs its ~18 GB of whole-tensor float64 and int64 copies.
CHECKSUM_CHUNK_ELEMENTS = 1 << 22


def _row_major_pieces(t: torch.Tensor, chunk: int):
    """``t`` in row-major order as consecutive 1-D pieces of at most ``chunk`` elements.

    Contiguous tensors are cut from a flat view (no copy); a strided slice (a column shard)
    is cut into groups of whole rows, so only one piece at a time is copied.
    """
    if t.dim() <= 1 or t.is_contiguous():
        flat = t.reshape(-1)
        for a in range(0, flat.numel(), chunk):
            yield flat[a : a + chunk]
        return
    row = t[0].numel()
    if row == 0:
        return
    if row > chunk:
        for r in range(t.shape[0]):
            yield from _row_major_pieces(t[r], chunk)
        return
    step = chunk // row
    for r in range(0, t.shape[0], step):
        yield t[r : r + step].reshape(-1)


def tensor_checksum(t: torch.Tensor, *, chunk_elements: int = CHECKSUM_CHUNK_ELEMENTS) -> tuple[float, float, float]:
    """(sum, sum|x|, sum x_i * w_i) in float64 with fixed pseudo-random weights w_i in [-0.5, 0.5).

    ``i`` is the row-major position in ``t``.  Computed ``chunk_elements`` at a time with the
    running sums kept on the tensor's device (one host sync at the end): the values equal the
    whole-tensor formula up to float64 summation order, far inside :data:`RTOL`.
    """
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
    t = t.detach()
    acc = torch.zeros(3, dtype=torch.float64, device=t.device)
    offset = 0
    for piece in _row_major_pieces(t, chunk_elements):
        x = piece.to(torch.float64)
        idx = torch.arange(offset, offset + x.numel(), dtype=torch.int64, device=x.device)
        w = ((idx * 2654435761) % 4096).to(torch.float64) / 4096.0 - 0.5
        del idx
        acc += torch.stack([x.sum(), x.abs().sum(), (x * w).sum()])
        offset += x.numel()
    total, absolute, weighted = acc.tolist()
    return (total, absolute, weighted)


def _close(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    scale = max(abs(a[1]), abs(b[1]), 1e-30)
    return all(abs(x - y) <= RTOL * scale for x, y in zip(a, b, strict=True))


def effective_linear_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The ``[out, in]`` weight a vLLM layer multiplies with, read through its CPU kernel when it has one.

    On CPU vLLM repacks the weight of every GEMM layer (linear layers and the LM head) into
    a kernel-owned copy at load time; linear layers then drop ``weight``, while the LM head
    keeps it beside the packed copy.  Reading ``weight`` would then check a tensor the model
    does not compute with: a head whose kernel missed an update (tied embeddings) would pass.
    So whenever a kernel exists, it is probed with identity rows.
    """
    w = layer.weight
    probe = getattr(layer, "cpu_linear", None)
    if probe is None:
        if w.numel() == 0:
            raise RuntimeError(f"{type(layer).__name__}: weight is empty and there is no cpu_linear kernel to probe")
        return w.detach()
    k = int(w.shape[1]) if w.numel() > 0 else int(layer.input_size_per_partition)
    dtype = w.dtype if w.numel() > 0 else layer.params_dtype
    cols = []
    step = 1024
    with torch.no_grad():
        for a in range(0, k, step):
            b = min(a + step, k)
            eye = torch.zeros(b - a, k, dtype=dtype)
            eye[torch.arange(b - a), torch.arange(a, b)] = 1
            cols.append(probe(eye, w, None))  # [b-a, out] = W[:, a:b]^T
    return torch.cat(cols, dim=0).t().contiguous()


def engine_checksums(vllm_model: torch.nn.Module) -> dict[str, ShardChecksum]:
    """Checksums of every weight of this engine rank, keyed by the HF tensor name (runs in the worker).

    The engine's parameters are split by the same rules that decide what a rank receives
    (:func:`~dapo_megatron.weight_sync.engine_layout.engine_parts`); the split must cover each
    parameter exactly (vocab padding rows aside), so a rule that drifted from vLLM's layout fails here.
    """
    # optional dependency: vLLM (runs in the engine's worker; the module imports without it)
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    out: dict[str, ShardChecksum] = {}
    with torch.no_grad():
        for module, parts in engine_parts(vllm_model):
            tensors: dict[str, torch.Tensor] = {}
            for p in parts:
                if p.leaf not in tensors:
                    if isinstance(module, (LinearBase, ParallelLMHead)) and p.leaf == "weight":
                        tensors[p.leaf] = effective_linear_weight(module)
                    else:
                        tensors[p.leaf] = getattr(module, p.leaf).detach()
            covered: dict[tuple[str, int], int] = {}
            for p in parts:
                t = tensors[p.leaf]
                if p.part.dim is None:
                    piece = t
                else:
                    if p.local_start + p.part.length > t.shape[p.part.dim]:
                        raise RuntimeError(
                            f"{p.engine_param} {tuple(t.shape)}: slice of {p.hf_name!r} at {p.local_start} "
                            f"+{p.part.length} on dim {p.part.dim} runs past the parameter"
                        )
                    piece = t.narrow(p.part.dim, p.local_start, p.part.length)
                    key = (p.leaf, p.part.dim)
                    covered[key] = covered.get(key, 0) + p.part.length
                if p.hf_name in out:
                    raise RuntimeError(
                        f"engine tensor for {p.hf_name!r} seen twice ({out[p.hf_name].engine_param}, {p.engine_param})"
                    )
                sl = p.part
                out[p.hf_name] = ShardChecksum(
                    p.hf_name, p.engine_param, sl.dim, sl.start, sl.length, tensor_checksum(piece), str(t.dtype)
                )
            padded = any(p.padded for p in parts)
            for (leaf, dim), n in covered.items():
                size = tensors[leaf].shape[dim]
                if n != size and not (padded and n < size):
                    raise RuntimeError(
                        f"{type(module).__name__} {leaf}: the HF slices cover {n} of {size} entries on dim {dim}"
                    )
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
