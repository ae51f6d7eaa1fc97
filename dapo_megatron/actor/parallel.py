"""torch.distributed + megatron-core parallel-state set-up and tear-down.

``init_parallel`` works in three situations:

* under ``torchrun`` (``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``
  in the environment): joins the job's process group;
* in a plain single process without those variables: creates a 1-rank group
  (handy for TP=1 tests and tools that run in-process);
* when torch.distributed is already initialised by the caller: reuses it.

The backend is :func:`dapo_megatron.distributed.default_backend`: ``cpu:gloo,cuda:nccl``
when CUDA is available (CPU-side agreements stay legal next to NCCL), gloo otherwise.  On a
machine without CUDA the CPU shims (:mod:`dapo_megatron.compat.megatron_cpu`) are applied;
importing that module patches nothing, so a GPU run, which never applies them, is unaltered.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from dapo_megatron.compat.megatron_cpu import apply_cpu_shims
from dapo_megatron.distributed import default_backend

__all__ = ["init_parallel", "destroy_parallel", "is_cpu_run"]

_WE_CREATED_PROCESS_GROUP = False


def is_cpu_run() -> bool:
    """True when this process has no CUDA device (CPU/gloo mode)."""
    return not torch.cuda.is_available()


def _init_process_group(timeout_minutes: int, cpu_only: bool = False) -> None:
    global _WE_CREATED_PROCESS_GROUP
    if dist.is_initialized():
        return
    use_cuda = not cpu_only and not is_cpu_run()
    backend = default_backend(cuda_available=use_cuda)
    timeout = timedelta(minutes=timeout_minutes)
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        # Single process outside torchrun: an in-memory store is enough.
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    _WE_CREATED_PROCESS_GROUP = True


def init_parallel(
    tp: int = 1,
    pp: int = 1,
    *,
    seed: int,
    virtual_pp: int | None = None,
    timeout_minutes: int = 30,
    cpu_only: bool = False,
) -> None:
    """Initialise torch.distributed (if needed) and megatron's model-parallel state.

    Args:
        tp: tensor-model-parallel size.
        pp: pipeline-model-parallel size.
        seed: base seed for megatron's RNG tracker (data-parallel stream = ``seed``,
            tensor-parallel stream = ``seed + 2718 + tp_rank``) and for torch's
            default generator.
        virtual_pp: virtual pipeline size (interleaved schedule), or None.
        timeout_minutes: collective timeout.
        cpu_only: never touch a GPU, even when one is present: a gloo group, no CUDA device
            selected, no CUDA RNG seeded.  For tools that build models on CPU or meta only
            (the converter); models built this way must not draw random numbers from
            megatron's tracker (build them with ``perform_initialization=False``).

    Raises:
        ValueError: if the world size is not a multiple of ``tp * pp``.
    """
    if tp < 1 or pp < 1:
        raise ValueError(f"tp and pp must be >= 1, got tp={tp} pp={pp}")
    _init_process_group(timeout_minutes, cpu_only=cpu_only)
    world = dist.get_world_size()
    if world % (tp * pp) != 0:
        raise ValueError(f"world size {world} is not divisible by tp*pp = {tp}*{pp}")

    if is_cpu_run():
        apply_cpu_shims()

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=virtual_pp,
        distributed_timeout_minutes=timeout_minutes,
    )
    torch.manual_seed(seed)
    if cpu_only and not is_cpu_run():
        return  # megatron's seeding reads and writes the CUDA generator
    # On CPU the shimmed tracker keeps per-stream CPU generator states; on GPU this
    # is megatron's usual CUDA seeding.
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def destroy_parallel(destroy_process_group: bool = True) -> None:
    """Tear down megatron's parallel state and, if we created it, the process group."""
    global _WE_CREATED_PROCESS_GROUP
    parallel_state.destroy_model_parallel()
    if destroy_process_group and _WE_CREATED_PROCESS_GROUP and dist.is_initialized():
        dist.destroy_process_group()
        _WE_CREATED_PROCESS_GROUP = False
