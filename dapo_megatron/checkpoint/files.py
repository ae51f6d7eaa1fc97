"""Durable and all-or-nothing file writes shared by every checkpoint writer.

Why staging: a conversion either produces a complete directory or nothing.  Output is
written into a hidden sibling ``.NAME.tmp-PID`` and renamed to ``NAME`` only after the
last byte is written; on any error the staging directory is removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` through a temp file, fsync and rename: readers see the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (the directory entry, not only the files)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_output_free(out: str | os.PathLike) -> None:
    """Raise FileExistsError unless ``out`` is absent or an empty directory."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output {out} already exists and is not empty")


@contextlib.contextmanager
def staged_output_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging directory that becomes ``out`` on success, vanishes on error.

    Raises:
        FileExistsError: ``out`` exists and is not empty (nothing is ever overwritten).
    """
    out = Path(out)
    ensure_output_free(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()  # empty (checked above)
    os.rename(stage, out)
