"""Slices of HF tensors and the NaN placeholder a receiver hands the engine (weight_sync/slices.py)."""

from __future__ import annotations

import pytest
import torch

from dapo_megatron.weight_sync.slices import WHOLE, TensorSlice, nan_placeholder
from dapo_megatron.weight_sync.transport import Transport
from dapo_megatron.weight_sync.verify import ShardChecksum, WeightMismatchError, compare_checksums, tensor_checksum


def test_slice_geometry():
    rows = TensorSlice(0, 4, 3)
    cols = TensorSlice(1, 2, 2)
    assert rows.shape_in((10, 6)) == (3, 6) and cols.shape_in((10, 6)) == (10, 2)
    assert WHOLE.shape_in((10, 6)) == (10, 6)
    full = torch.arange(60.0).reshape(10, 6)
    assert torch.equal(rows.of(full), full[4:7]) and torch.equal(cols.of(full), full[:, 2:4])
    assert WHOLE.of(full) is full
    assert TensorSlice(0, 0, 10).covers((10, 6)) and WHOLE.covers((10, 6))
    assert not rows.covers((10, 6)) and not TensorSlice(0, 0, 9).covers((10, 6))


@pytest.mark.parametrize(
    ("part", "what"),
    [
        (TensorSlice(0, 8, 3), r"\[8, 11\) on dim 0"),
        (TensorSlice(2, 0, 1), "slice dim 2"),
        (TensorSlice(1, -1, 2), r"\[-1, 1\) on dim 1"),
    ],
)
def test_slice_check_names_the_tensor(part, what):
    with pytest.raises(ValueError, match=what) as info:
        part.check((10, 6), "model.layers.0.mlp.up_proj.weight")
    assert "model.layers.0.mlp.up_proj.weight" in str(info.value)
    TensorSlice(0, 7, 3).check((10, 6), "ok")  # the last rows are inside
    WHOLE.check((10, 6), "ok")


def test_placeholder_is_nan_outside_the_received_part():
    full = torch.randn(8, 4)
    part = TensorSlice(0, 4, 4)
    t = nan_placeholder((8, 4), torch.float32, "cpu")
    part.of(t).copy_(part.of(full))
    assert torch.equal(part.of(t), full[4:])
    assert torch.isnan(t[:4]).all()
    with pytest.raises(TypeError, match="floating dtype"):
        nan_placeholder((2,), torch.int64, "cpu")


def test_verification_of_a_placeholder_checks_only_the_part_and_catches_nan():
    """A receiver's placeholder verifies exactly when the engine holds that part, and fails on NaN."""
    full = torch.randn(8, 4)
    got = nan_placeholder((8, 4), torch.float32, "cpu")
    TensorSlice(0, 4, 4).of(got).copy_(full[4:])
    held = ShardChecksum("w", "engine.w", 0, 4, 4, tensor_checksum(full[4:]), "torch.float32")
    assert compare_checksums({"w": held}, [("w", got)]) == 1
    # an engine that read the rows this rank did not receive holds NaN: named as a mismatch
    nan_rows = torch.full((4, 4), float("nan"))
    read_wrong = ShardChecksum("w", "engine.w", 0, 4, 4, tensor_checksum(nan_rows), "torch.float32")
    with pytest.raises(WeightMismatchError, match="w \\(engine engine.w, dim=0 start=4 len=4\\)"):
        compare_checksums({"w": read_wrong}, [("w", got)])


def test_transport_default_needs_every_tensor_whole():
    class Plain(Transport):
        def begin(self): ...
        def send(self, bucket): ...
        def finish(self): ...
        def abort(self, reason): ...

    assert Plain().needed_slices() is None
