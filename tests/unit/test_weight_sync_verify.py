"""Checksum comparison of engine shards against actor tensors (weight_sync/verify.py, actor side)."""

from __future__ import annotations

import pytest
import torch

from dapo_megatron.weight_sync.verify import ShardChecksum, WeightMismatchError, compare_checksums, tensor_checksum


def _shard(name: str, full: torch.Tensor, dim: int | None, start: int, length: int) -> ShardChecksum:
    piece = full if dim is None else full.narrow(dim, start, length)
    return ShardChecksum(name, f"engine.{name}", dim, start, length, tensor_checksum(piece), str(full.dtype))


def test_checksum_detects_permutations_and_small_changes():
    x = torch.randn(64, 32)
    base = tensor_checksum(x)
    assert tensor_checksum(x.clone()) == base
    swapped = torch.cat([x[32:], x[:32]])  # same sum and abs-sum, different placement
    assert tensor_checksum(swapped)[:2] == pytest.approx(base[:2])
    assert tensor_checksum(swapped)[2] != pytest.approx(base[2], rel=1e-9, abs=1e-9)
    y = x.clone()
    y[3, 4] += 1e-3
    assert tensor_checksum(y) != base


def test_compare_accepts_matching_shards():
    q = torch.randn(8, 4)
    o = torch.randn(4, 8)
    norm = torch.randn(4)
    engine = {
        "q": _shard("q", q, 0, 4, 4),  # second half of the rows (TP rank 1 of 2)
        "o": _shard("o", o, 1, 0, 4),  # first half of the columns
        "norm": _shard("norm", norm, None, 0, 0),
    }
    assert compare_checksums(engine, [("q", q), ("o", o), ("norm", norm)]) == 3


def test_compare_names_every_problem():
    q, o, norm, extra = torch.randn(8, 4), torch.randn(4, 8), torch.randn(4), torch.randn(2)
    engine = {
        "q": _shard("q", q, 0, 0, 4),
        "o": _shard("o", o, 1, 0, 4),
        "only_engine": _shard("only_engine", extra, None, 0, 0),
    }
    o_bad = o.clone()
    o_bad[0, 1] += 0.5
    with pytest.raises(WeightMismatchError) as info:
        compare_checksums(engine, [("q", q), ("o", o_bad), ("norm", norm)], rank_desc="rank 1")
    msg = str(info.value)
    assert "rank 1" in msg and "3 tensor(s)" in msg
    assert "o (engine engine.o, dim=1 start=0 len=4)" in msg
    assert "norm: produced by the actor but not held by the engine" in msg
    assert "only_engine: held by the engine" in msg
    reported = [line.strip().split(" ")[0].rstrip(":") for line in msg.splitlines()[1:]]
    assert sorted(reported) == ["norm", "o", "only_engine"]  # the matching tensor q is not reported
