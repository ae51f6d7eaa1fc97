"""Collective agreement on a checkpoint write that failed on some rank.

Why: a failed write on one rank (a full disk) must stop the save on every rank with the same
error, instead of one rank raising while the others wait in the next collective.  Every
phase of a save ends in :func:`agree_on_failure` (or runs on rank 0 in :func:`rank0_phase`),
and the message names each failing rank's error and the free space.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch.distributed as dist

from dapo_megatron.checkpoint.layout import pointer_text
from dapo_megatron.distributed import all_max, any_true, this_rank, world_size

logger = logging.getLogger(__name__)


class CheckpointSaveError(RuntimeError):
    """A save failed on some rank; raised on every rank, ``latest`` unchanged."""


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rank0_phase(fn, what: str) -> Any:
    """Run ``fn`` on rank 0; every rank raises if it failed (no rank is left in a barrier)."""
    result, error = None, None
    if this_rank() == 0:
        try:
            result = fn()
        except Exception as e:  # re-raised below on rank 0, reported on the others
            error = e
    failed = any_true(error is not None)
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"checkpoint {what} failed on rank 0 (see its error)")
    return result


_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\]")


def _errno_of(exc: BaseException) -> int | None:
    """The errno of the first OSError in an exception's causes, or of an ``[Errno N]`` in its text.

    Why the text: megatron gathers each rank's write failure to the coordinator by pickling
    it, and a pickled exception loses its ``__cause__``; the OSError survives only as
    "Worker failure: [Errno 28] No space left on device".
    """
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e.errno
        if m := _ERRNO_TEXT.search(str(e)):
            return int(m.group(1))
        todo += [e.__cause__, e.__context__]
    return None


_UNKNOWN_FAILURE = 100_000.0  # a failure code above every errno


def _failure_codes(error: BaseException, rank: int, world: int) -> list[float]:
    """Per rank: the errno of its failure, ``_UNKNOWN_FAILURE``, or 0 (this rank knows of none).

    Megatron's ``CheckpointException`` lists every failed rank's exception on the coordinator
    (``failures: {rank: (exception, traceback)}``) and none on the other ranks, which only
    learn that the save failed: they report nothing of their own, the coordinator reports for them.
    """
    codes = [0.0] * world
    failures = getattr(error, "failures", None)
    if isinstance(failures, Mapping):
        for r, wrapped in failures.items():
            cause = wrapped[0] if isinstance(wrapped, tuple) else wrapped
            code = _errno_of(cause) if isinstance(cause, BaseException) else None
            codes[int(r)] = float(code) if code else _UNKNOWN_FAILURE
        return codes
    code = _errno_of(error)
    codes[rank] = float(code) if code else _UNKNOWN_FAILURE
    return codes


def agree_on_failure(error: BaseException | None, *, root: Path, tmp: Path, final: Path, undo=None) -> None:
    """Collective: if ``error`` is set on any rank, every rank raises the same :class:`CheckpointSaveError`.

    One ``all_max`` carries, per rank, the errno of its failure (or "unknown"; see
    :func:`_failure_codes`), rank 0's free-space reading and whether any rank failed, so the
    message names every failing rank and its error on every rank.  Rank 0 measures the free
    space (the cause, usually) before it runs ``undo`` (if the failure came after the
    rename) and removes the partial directory, so that a re-run finds the disk as it was
    before the save and ``latest`` still names the previous checkpoint.  A failing rank
    logs its own exception with the traceback first.
    """
    rank = this_rank()
    world = world_size()
    vector = [0.0] * (world + 2)
    if error is not None:
        vector[:world] = _failure_codes(error, rank, world)
        vector[world + 1] = 1.0
        logger.error("rank %d: saving checkpoint %s failed", rank, final.name, exc_info=error)
    if rank == 0:
        vector[world] = float(shutil.disk_usage(root if root.exists() else root.parent).free)
    merged = all_max(vector)
    if not merged[world + 1]:
        return
    failed = {r: int(c) for r, c in enumerate(merged[:world]) if c > 0}
    free = merged[world]
    notes = []
    if rank == 0:
        try:
            if undo is not None:
                undo()
            if tmp.exists():
                shutil.rmtree(tmp)
            notes.append(f"the partial {tmp} was removed")
        except OSError as exc:  # reported, not hidden: the message says what is left behind
            notes.append(f"removing the partial {tmp} failed too ({exc})")
    barrier()

    def cause(r: int, code: int) -> str:
        if code != _UNKNOWN_FAILURE:
            return f"rank {r}: [Errno {code}] {os.strerror(code)}"
        if r == rank and error is not None:
            return f"rank {r}: {type(error).__name__}: {error}"
        return f"rank {r}: an error that is not an OSError (see that rank's log)"

    causes = ", ".join(cause(r, c) for r, c in sorted(failed.items()))
    message = (
        f"saving checkpoint {final.name} into {tmp} failed ({causes}); "
        f"{_format_bytes(free)} free on the file system of {root} when it failed; {pointer_text(root)}"
        + "".join(f"; {n}" for n in notes)
    )
    raise CheckpointSaveError(message) from error


def _format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
