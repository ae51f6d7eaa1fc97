"""Grouping a stream of named tensors into size-capped buckets, and flat packing.

Why buckets: the gather side produces one tensor at a time (a collective each), the
engine side pays a fixed cost per hand-over (an RPC, a stream sync, on GPU an IPC
handle).  A bucket amortises that cost while capping the memory in flight at
``bucket_size_mb`` (plus one tensor, when a single tensor is larger than the cap).

:class:`PackedBucket` is the byte form for transports that move memory, not Python
objects (CUDA IPC, a broadcast to a separate engine process): one contiguous uint8
buffer plus (name, dtype, shape, offset) records; :meth:`PackedBucket.tensors` gives
views without copying.  The in-process colocated transport hands tensors over as they
are and does not need it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

__all__ = ["iter_buckets", "bucket_bytes_from_mb", "PackedBucket", "TensorRecord"]

_ALIGN = 64  # bytes; keeps every view aligned for vectorised kernels


def bucket_bytes_from_mb(mb: float) -> int:
    if mb <= 0:
        raise ValueError(f"rollout.weight_sync.bucket_size_mb must be > 0, got {mb}")
    return int(mb * (1 << 20))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def iter_buckets(named: Iterable[tuple[str, torch.Tensor]], cap_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive, order-preserving groups whose total size is at most ``cap_bytes``.

    A tensor larger than the cap forms a bucket on its own.  Empty input gives no buckets.
    """
    if cap_bytes <= 0:
        raise ValueError(f"bucket cap must be > 0 bytes, got {cap_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named:
        n = _nbytes(t)
        if bucket and size + n > cap_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += n
    if bucket:
        yield bucket


@dataclass(frozen=True)
class TensorRecord:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass
class PackedBucket:
    """One contiguous byte buffer holding several tensors."""

    buffer: torch.Tensor  # uint8, 1-D
    records: list[TensorRecord]

    @classmethod
    def pack(cls, named: list[tuple[str, torch.Tensor]]) -> PackedBucket:
        records, offset = [], 0
        for name, t in named:
            n = _nbytes(t)
            records.append(TensorRecord(name, t.dtype, tuple(t.shape), offset, n))
            offset += -(-n // _ALIGN) * _ALIGN
        device = named[0][1].device if named else torch.device("cpu")
        buf = torch.empty(offset, dtype=torch.uint8, device=device)
        for (_name, t), rec in zip(named, records, strict=True):
            if rec.nbytes:
                buf[rec.offset : rec.offset + rec.nbytes].copy_(t.contiguous().reshape(-1).view(torch.uint8))
        return cls(buf, records)

    @property
    def nbytes(self) -> int:
        return int(self.buffer.numel())

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Views into the buffer (no copy), in packing order."""
        out = []
        for rec in self.records:
            flat = self.buffer[rec.offset : rec.offset + rec.nbytes].view(rec.dtype)
            out.append((rec.name, flat.reshape(rec.shape)))
        return out
