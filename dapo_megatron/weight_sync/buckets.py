"""Grouping a stream of named tensors into size-capped buckets.

Why buckets: the gather side produces one tensor at a time (a collective each), the
engine side pays a fixed cost per hand-over (an RPC, a stream sync, on GPU an IPC
handle).  A bucket amortises that cost while capping the memory in flight at
``bucket_size_mb`` (plus one tensor, when a single tensor is larger than the cap).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

__all__ = ["iter_buckets", "bucket_bytes_from_mb"]


def bucket_bytes_from_mb(mb: float) -> int:
    if mb <= 0:
        raise ValueError(f"rollout.weight_sync.bucket_size_mb must be > 0, got {mb}")
    return int(mb * (1 << 20))


def iter_buckets(named: Iterable[tuple[str, torch.Tensor]], cap_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive, order-preserving groups whose total size is at most ``cap_bytes``.

    A tensor larger than the cap forms a bucket on its own.  Empty input gives no buckets.
    """
    if cap_bytes <= 0:
        raise ValueError(f"bucket cap must be > 0 bytes, got {cap_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named:
        n = t.numel() * t.element_size()
        if bucket and size + n > cap_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += n
    if bucket:
        yield bucket
