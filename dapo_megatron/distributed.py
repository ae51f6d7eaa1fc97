"""One device policy for collectives: which backend the default group uses, and where small
agreements (flags, counters, metric sums) run.

Why a policy at all: NCCL reduces CUDA tensors only, yet the trainer, checkpointing, SFT and
the reward pool agree on small CPU-side values (a stop flag, "did rank 0 fail", summed pool
counters).  A default group of plain ``nccl`` makes each of those raise on a GPU run.  So, as
torchtitan and verl do, a CUDA run initialises the default group with
``cpu:gloo,cuda:nccl``: CPU tensors go through gloo, CUDA tensors through NCCL, and every
subgroup megatron creates without naming a backend inherits both.  A CPU run uses gloo.

The helpers below take and return plain Python values.  Each picks the tensor's device from the
group's backend configuration (:func:`scalar_device`), so they stay legal even on a group created
by someone else with NCCL alone (they then use the current CUDA device).  Without an initialised
process group they return the local values: one process is its own world.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = [
    "all_max",
    "all_sum",
    "any_true",
    "default_backend",
    "scalar_device",
    "supports_cpu_tensors",
    "this_rank",
    "world_size",
]


def default_backend(cuda_available: bool) -> str:
    """Backend string for ``init_process_group``: ``cpu:gloo,cuda:nccl`` with CUDA, else ``gloo``."""
    return "cpu:gloo,cuda:nccl" if cuda_available else "gloo"


def supports_cpu_tensors(backend_config: str) -> bool:
    """Whether a group of this backend configuration (``dist.get_backend_config``'s
    ``device:backend,...`` string, or a plain backend name) reduces CPU tensors."""
    config = backend_config.lower()
    if ":" not in config:
        return config in ("gloo", "mpi", "ucc")
    devices = {pair.split(":", 1)[0].strip() for pair in config.split(",") if pair.strip()}
    return "cpu" in devices


def scalar_device(group=None) -> torch.device:
    """Where a small agreement tensor must live to be reduced over ``group`` (default: world)."""
    if supports_cpu_tensors(dist.get_backend_config(group)):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def this_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _reduce(values: Sequence[float], op, group, dtype: torch.dtype) -> list[float]:
    if not dist.is_initialized():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=dtype, device=scalar_device(group))
    dist.all_reduce(t, op=op, group=group)
    return t.cpu().tolist()


def all_sum(values: Sequence[float], group=None) -> list[float]:
    """Element-wise sum over the ranks of ``group``, in float64."""
    return _reduce(values, dist.ReduceOp.SUM, group, torch.float64)


def all_max(values: Sequence[float], group=None) -> list[float]:
    """Element-wise maximum over the ranks of ``group``, in float64."""
    return _reduce(values, dist.ReduceOp.MAX, group, torch.float64)


def any_true(flag: bool, group=None) -> bool:
    """True on every rank of ``group`` when any rank passes True."""
    return all_max([1.0 if flag else 0.0], group=group)[0] > 0
