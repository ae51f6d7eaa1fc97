"""Which part of a full HF tensor a rank needs (:class:`TensorSlice`), and the NaN placeholder.

Why a type of its own: three places must agree on one description of "the part of
``model.layers.3.self_attn.q_proj.weight`` that engine TP rank 1 holds" -- the engine
side that reads it off vLLM's layers (:mod:`.engine_layout`), the cross-stage transfer
that sends only that part (:mod:`.gather`), and verification that checksums it (:mod:`.verify`).

Why a placeholder: vLLM's weight loaders take the *full* HF tensor and narrow it to their
TP rank themselves (``VocabParallelEmbedding.weight_loader`` even asserts the full vocab
size), so a rank that received only its part hands the engine a full-shaped tensor whose
other elements are NaN.  If our idea of the part ever disagreed with the loader's, the
engine would load NaN -- caught by verification and by the first forward pass, never a
silently wrong weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TensorSlice", "WHOLE", "nan_placeholder"]


@dataclass(frozen=True)
class TensorSlice:
    """``full.narrow(dim, start, length)``; ``dim=None`` means the whole tensor."""

    dim: int | None = None
    start: int = 0
    length: int = 0

    def check(self, shape: tuple[int, ...], name: str) -> None:
        """Raise ValueError (naming the tensor) unless the slice lies inside a tensor of ``shape``."""
        if self.dim is None:
            return
        if not 0 <= self.dim < len(shape):
            raise ValueError(f"{name}: slice dim {self.dim} outside a tensor of shape {tuple(shape)}")
        if self.start < 0 or self.length < 0 or self.start + self.length > shape[self.dim]:
            raise ValueError(
                f"{name}: slice [{self.start}, {self.start + self.length}) on dim {self.dim} outside "
                f"a tensor of shape {tuple(shape)}"
            )

    def covers(self, shape: tuple[int, ...]) -> bool:
        """True when the slice is the whole tensor (e.g. every part at engine TP=1)."""
        return self.dim is None or (self.start == 0 and self.length == shape[self.dim])

    def shape_in(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.dim is None:
            return tuple(shape)
        out = list(shape)
        out[self.dim] = self.length
        return tuple(out)

    def of(self, full: torch.Tensor) -> torch.Tensor:
        """The slice as a view of ``full``."""
        return full if self.dim is None else full.narrow(self.dim, self.start, self.length)


WHOLE = TensorSlice()


def nan_placeholder(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A full-shaped all-NaN tensor; the receiver writes its part into ``part.of(result)``."""
    if not dtype.is_floating_point:
        raise TypeError(f"a NaN placeholder needs a floating dtype, got {dtype} (weights are float)")
    return torch.full(shape, float("nan"), dtype=dtype, device=device)
