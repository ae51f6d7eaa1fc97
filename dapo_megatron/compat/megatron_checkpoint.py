"""Patches of megatron-core's ``dist_checkpointing`` save path.

Guarded by :func:`dapo_megatron.compat.guard`; ranges, tests and root causes are in
:data:`dapo_megatron.compat.PATCHES` and docs/COMPAT.md.

``FileSystemWriterAsync.preload_tensors`` on a CPU-only torch (CPU only)
    It stages tensors to host memory with ``non_blocking=True`` and then calls
    ``torch.cuda.synchronize()``, which raises on a CPU build.  On CPU the tensors already
    live in host memory, so the wrapper forces ``non_blocking=False`` (no synchronise).  Here
    rather than with the other CPU shims because only checkpointing needs it, and checkpoint
    code (imported on GPU too) applies it lazily at every save; it is a no-op with CUDA.
    Refused outside the measured range, like the other CPU shims: a CPU run is a test run.

Failures of the writes only one rank does (every device)
    megatron-core's ``dist_checkpointing.save`` (0.16.1, 0.19.2) agrees on failures of the
    tensor-data writes (gathered to the coordinator, then broadcast), but not on the files
    only one rank writes: rank 0's ``common.pt`` (written before the collective planning),
    the coordinator's ``.metadata`` (written before the failure broadcast), rank 0's
    ``metadata.json`` (written before a barrier), and per-rank sharded objects.  A full disk
    at any of those raises on that rank alone while the others wait in the next collective
    for as long as the process group's timeout.  :func:`single_rank_writes_deferred` makes
    those writes record their exception instead of raising for the duration of one save, so
    megatron's collectives run to the end on every rank and the caller raises everywhere.
    Warned, not refused, outside the range: the wrapper only changes where a failure is
    raised (the caller re-raises every recorded error), never whether.

The writer's results queue in a synchronous save (every device)
    ``FileSystemWriterAsync`` hands its write results to the caller through a queue made by
    ``_get_write_results_queue``: a ``multiprocessing`` Manager started with "spawn", once per
    process, so that an asynchronous save's writer process can reach it.  A spawned child
    re-imports the training script's modules (torch, megatron-core, vLLM): on the 2-core CPU
    machine the demo's first checkpoint took 8-24 s against 0.4 s for the next ones, and each
    rank keeps a ~580 MB process for the rest of the run.  This project saves synchronously
    (the writes run in the calling process), so :func:`sync_save_results_in_process` gives
    one save an in-process queue and restores upstream's function after it.
"""

from __future__ import annotations

import contextlib
import functools
import queue
from collections.abc import Callable, Iterator
from typing import Any

import torch
from megatron.core.dist_checkpointing import serialization
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies.common import TorchCommonSaveStrategy
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

from dapo_megatron.compat import guard

__all__ = ["apply_writer_cpu_shim", "single_rank_writes_deferred", "sync_save_results_in_process"]

_WRITER_SHIM_APPLIED = False


def apply_writer_cpu_shim() -> None:
    """Make megatron's checkpoint writer work on a CPU-only torch (no-op when CUDA exists).

    Raises:
        UnverifiedVersionError: megatron-core is outside the range the shim was measured on.
    """
    global _WRITER_SHIM_APPLIED
    if _WRITER_SHIM_APPLIED or torch.cuda.is_available():
        return
    guard("cpu-writer-preload")
    original = FileSystemWriterAsync.preload_tensors

    def preload_tensors(write_buckets, non_blocking: bool = True):
        return original(write_buckets, non_blocking=False)

    FileSystemWriterAsync.preload_tensors = staticmethod(preload_tensors)
    _WRITER_SHIM_APPLIED = True


def _deferred(fn: Callable[..., Any], errors: list[BaseException]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # re-raised on every rank by the caller
            errors.append(exc)
            return None

    return wrapper


@contextlib.contextmanager
def single_rank_writes_deferred(errors: list[BaseException]) -> Iterator[None]:
    """Around ``dist_checkpointing.save``: single-rank writes append their error to ``errors``.

    The caller must raise the collected errors on every rank after the save (the actor's
    checkpoint code agrees on them with one collective).  Restored on exit.
    """
    guard("single-rank-writes-deferred")
    targets = [
        (TorchCommonSaveStrategy, "save_common"),
        (TorchCommonSaveStrategy, "save_sharded_objects"),
        (FileSystemWriterAsync, "finish"),
        (serialization, "save_config"),
    ]
    # all four exist in 0.16.1; a release without one does not do that write that way
    originals = [(owner, name, getattr(owner, name)) for owner, name in targets if hasattr(owner, name)]
    for owner, name, fn in originals:
        setattr(owner, name, _deferred(fn, errors))
    try:
        yield
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)


@contextlib.contextmanager
def sync_save_results_in_process() -> Iterator[None]:
    """Around a synchronous ``dist_checkpointing.save``: the writer reports its results through
    an in-process queue instead of a spawned Manager's.  Restored on exit."""
    guard("sync-save-results-in-process")
    original = filesystem_async._get_write_results_queue
    results: queue.Queue = queue.Queue()
    filesystem_async._get_write_results_queue = lambda: results
    try:
        yield
    finally:
        filesystem_async._get_write_results_queue = original
