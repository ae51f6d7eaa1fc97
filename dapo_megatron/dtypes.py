"""The floating-point dtypes a config may name, and what each one is: the one table.

The schema (``actor.params_dtype``, ``rollout.dtype``), the actor, the engine's weight
sync, the checkpoint converter and the planner's byte counts all read it. torch is
imported only when a name is turned into a ``torch.dtype``, so the config and the
planner load without it.
"""

from __future__ import annotations

import typing

if typing.TYPE_CHECKING:
    import torch

# name -> bytes per element; the names are torch's own (``torch.bfloat16``, ...)
DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}
DTYPES: tuple[str, ...] = tuple(DTYPE_BYTES)


def torch_dtype(name: str, key: str = "dtype") -> torch.dtype:
    """``torch.<name>`` for a name in :data:`DTYPES`; ValueError naming ``key`` otherwise."""
    if name not in DTYPE_BYTES:
        raise ValueError(f"{key} must be one of {sorted(DTYPES)}, got {name!r}")
    import torch  # keeps `import dapo_megatron.config` (and the planner) free of torch

    return getattr(torch, name)
