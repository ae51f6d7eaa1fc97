"""Bucketing of named tensors (weight_sync/buckets.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dapo_megatron.weight_sync.buckets import bucket_bytes_from_mb, iter_buckets


def _named(sizes: list[int], dtype=torch.float32) -> list[tuple[str, torch.Tensor]]:
    return [(f"t{i}", torch.arange(n, dtype=dtype)) for i, n in enumerate(sizes)]


def test_buckets_respect_cap_and_order():
    named = _named([10, 10, 10, 30, 5])  # float32: 40, 40, 40, 120, 20 bytes
    buckets = list(iter_buckets(named, cap_bytes=80))
    assert [[n for n, _ in b] for b in buckets] == [["t0", "t1"], ["t2"], ["t3"], ["t4"]]
    # the oversized tensor (120 B > 80 B) travels alone; nothing is dropped or reordered
    assert [n for b in buckets for n, _ in b] == [n for n, _ in named]


def test_buckets_edge_cases():
    assert list(iter_buckets([], cap_bytes=8)) == []
    assert len(list(iter_buckets(_named([2, 2]), cap_bytes=16))) == 1  # exactly at the cap: one bucket
    with pytest.raises(ValueError, match="bucket cap"):
        list(iter_buckets(_named([1]), cap_bytes=0))
    with pytest.raises(ValueError, match="bucket_size_mb"):
        bucket_bytes_from_mb(0)
    assert bucket_bytes_from_mb(0.5) == 512 * 1024


def test_buckets_are_streamed_lazily():
    """The producer is not drained ahead of the consumer (memory stays at one bucket)."""
    produced = []

    def gen():
        for i in range(6):
            produced.append(i)
            yield f"t{i}", torch.zeros(4)  # 16 B

    it = iter_buckets(gen(), cap_bytes=32)
    first = next(it)
    assert [n for n, _ in first] == ["t0", "t1"] and produced == [0, 1, 2]


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 50), max_size=20), cap=st.integers(1, 200))
def test_buckets_property(sizes, cap):
    named = _named(sizes)
    buckets = list(iter_buckets(named, cap_bytes=cap))
    assert [n for b in buckets for n, _ in b] == [n for n, _ in named]
    for b in buckets:
        total = sum(t.numel() * 4 for _, t in b)
        assert total <= cap or len(b) == 1
        assert b  # never empty
