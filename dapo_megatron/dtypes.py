"""The floating-point dtypes a config may name, and what each one is: the one table.

The schema (``actor.params_dtype``, ``rollout.dtype``), the actor, the engine's weight
sync, the checkpoint converter and the planner's byte counts all read it.  Free of torch,
so the config and the planner load without it; :func:`dapo_megatron.torch_dtypes.torch_dtype`
turns a name into a ``torch.dtype``.
"""

from __future__ import annotations

# name -> bytes per element; the names are torch's own (``torch.bfloat16``, ...)
DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}
DTYPES: tuple[str, ...] = tuple(DTYPE_BYTES)
