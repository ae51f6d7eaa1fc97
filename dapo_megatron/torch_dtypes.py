"""A dtype name of the table in :mod:`dapo_megatron.dtypes` as a ``torch.dtype`` (kept apart
from the table, which the config and the planner read without torch)."""

from __future__ import annotations

import torch

from dapo_megatron.dtypes import DTYPE_BYTES, DTYPES

__all__ = ["torch_dtype"]


def torch_dtype(name: str, key: str = "dtype") -> torch.dtype:
    """``torch.<name>`` for a name in :data:`~dapo_megatron.dtypes.DTYPES`; ValueError naming ``key`` otherwise."""
    if name not in DTYPE_BYTES:
        raise ValueError(f"{key} must be one of {sorted(DTYPES)}, got {name!r}")
    return getattr(torch, name)
