"""tensor_checksum works in bounded chunks and keeps the whole-tensor formula's values."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dapo_megatron.weight_sync.verify import tensor_checksum


def whole_tensor_checksum(t: torch.Tensor) -> tuple[float, float, float]:
    """The formula as it was before chunking: whole float64 and int64 copies of ``t``."""
    x = t.detach().reshape(-1).to(torch.float64)
    idx = torch.arange(x.numel(), dtype=torch.int64, device=x.device)
    w = ((idx * 2654435761) % 4096).to(torch.float64) / 4096.0 - 0.5
    return (float(x.sum()), float(x.abs().sum()), float((x * w).sum()))


def _close(a, b, rel=1e-12):
    scale = max(abs(a[1]), abs(b[1]))
    return all(abs(x - y) <= rel * scale for x, y in zip(a, b, strict=True))


class LargestResult(TorchDispatchMode):
    """Records the largest new storage any op allocates (bytes), i.e. the biggest temporary.

    Views (detach, reshape of a contiguous tensor, slices) share an input's storage and are not
    allocations, so outputs on an input's storage are skipped.
    """

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in [*args, *(kwargs or {}).values()] if isinstance(a, torch.Tensor)]
        shared = {a.untyped_storage().data_ptr() for a in inputs}
        for r in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(r, torch.Tensor) and r.untyped_storage().data_ptr() not in shared:
                self.largest = max(self.largest, r.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000, 1 << 22])
def test_chunked_equals_whole_tensor(dtype, chunk):
    g = torch.Generator().manual_seed(0)
    full = (torch.randn(37, 29, generator=g) * 3).to(dtype)
    for t in (full, full[5:20], full.narrow(1, 3, 11), full[:, 0], full.t(), full[0, 0]):
        assert _close(tensor_checksum(t, chunk_elements=chunk), whole_tensor_checksum(t)), (tuple(t.shape), chunk)


def test_temporaries_are_bounded_by_the_chunk():
    t = torch.randn(256, 512)  # 131072 elements: 1 MiB as float64
    chunk = 4096
    for view in (t, t.narrow(1, 100, 300)):  # contiguous, and a column slice (strided)
        mode = LargestResult()
        with mode:
            got = tensor_checksum(view, chunk_elements=chunk)
        assert _close(got, whole_tensor_checksum(view))
        assert mode.largest <= chunk * 8, (tuple(view.shape), mode.largest)
    mode = LargestResult()
    with mode:
        whole_tensor_checksum(t)
    assert mode.largest == t.numel() * 8  # what the old formula allocated


def test_bad_chunk_is_refused():
    with pytest.raises(ValueError, match="chunk_elements"):
        tensor_checksum(torch.ones(3), chunk_elements=0)
