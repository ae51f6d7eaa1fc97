"""Where the checkpoints of a run live, and which one is the newest.

Layout of a checkpoint root ``DIR``::

    DIR/step_00000010/            one checkpoint (a torch_dist directory)
        metadata.json, .metadata, __*.distcp, common.pt     megatron/torch DCP files
        dapo_checkpoint.json      model identity + HF config (:mod:`~dapo_megatron.checkpoint.metadata`)
        extra_state.pt            optional trainer state (rank 0, torch.save)
        rank_state/rank_00001.pt  optional per-rank state (each rank, e.g. its RNG streams)
    DIR/latest                    text file: the name of the newest complete step dir

Why a ``latest`` pointer plus a scan: the pointer is rewritten atomically after a commit;
when it is missing (a crash between the rename and the pointer update) the highest
complete ``step_*`` directory is the newest.  A damaged checkpoint is renamed aside
(:func:`quarantine_checkpoint`), never deleted.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from dapo_megatron.checkpoint.files import atomic_write_text, fsync_dir

META_FILE = "dapo_checkpoint.json"
EXTRA_STATE_FILE = "extra_state.pt"
RANK_STATE_DIR = "rank_state"
LATEST_FILE = "latest"
QUARANTINE_PREFIX = "damaged-"
_STEP_RE = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    """``step_00000042``: zero-padded so lexical and numeric order agree."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step_{step:08d}"


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Every ``step_N`` directory with a ``dapo_checkpoint.json``, oldest first."""
    steps = []
    if Path(root).is_dir():
        for p in Path(root).iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_dir() and (p / META_FILE).is_file():
                steps.append((int(m.group(1)), p))
    return [p for _, p in sorted(steps)]


def find_latest(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``root`` (None if there is none).

    Follows ``root/latest``; when that file is missing (e.g. a crash between the rename
    and the pointer update) falls back to the highest complete ``step_*`` directory.

    Raises:
        FileNotFoundError: ``latest`` names a directory that does not exist.
    """
    root = Path(root)
    pointer = root / LATEST_FILE
    if pointer.is_file():
        name = pointer.read_text().strip()
        target = root / name
        if not (target / META_FILE).is_file():
            raise FileNotFoundError(f"{pointer} names {name!r}, which is not a complete checkpoint in {root}")
        return target
    steps = complete_checkpoints(root)
    return steps[-1] if steps else None


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """A step directory for ``path``: the directory itself, or its latest checkpoint.

    Raises:
        FileNotFoundError: neither a checkpoint nor a root containing one.
    """
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    latest = find_latest(path)
    if latest is None:
        raise FileNotFoundError(f"no checkpoint at {path} (no {META_FILE} and no complete step_* directory)")
    return latest


def pointer_text(root: Path) -> str:
    """What ``latest`` names now, for messages."""
    pointer = root / LATEST_FILE
    return f"`latest` still names {pointer.read_text().strip()}" if pointer.is_file() else "no `latest` was written yet"


def quarantine_checkpoint(directory: str | os.PathLike) -> Path:
    """Rename a damaged ``step_N`` to ``damaged-step_N`` (single writer: rank 0) and return the new path.

    Why not delete it: it is the evidence of what went wrong, and may be partly salvageable.
    Why not leave it: the resumed run saves ``step_N`` again (a checkpoint is never
    overwritten), and :func:`find_latest` would keep finding it.
    """
    directory = Path(directory)
    target = directory.with_name(QUARANTINE_PREFIX + directory.name)
    n = 1
    while target.exists():
        n += 1
        target = directory.with_name(f"{QUARANTINE_PREFIX}{n}-{directory.name}")
    os.rename(directory, target)
    fsync_dir(directory.parent)
    return target


def point_latest(root: str | os.PathLike, directory: str | os.PathLike) -> None:
    """Rewrite ``root/latest`` to name ``directory`` (single writer: rank 0)."""
    atomic_write_text(Path(root) / LATEST_FILE, Path(directory).name + "\n")
