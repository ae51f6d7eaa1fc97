"""Checking a checkpoint's files against its manifest before the collective load starts.

Why verify before loading: :func:`verify_checkpoint` compares every file with the
manifest (sizes always, CRCs on request) before the collective load starts, so a
truncated or corrupted shard is named instead of surfacing as a bare ``EOFError`` from
torch's DCP reader on one rank.  Checkpoints written before manifests existed have none
and no ``"manifest": true`` in ``dapo_checkpoint.json``: they load unverified, with a
warning (refusing them would strand every existing run); one that records a manifest but
has lost it is damaged.
"""

from __future__ import annotations

import enum
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from dapo_megatron.checkpoint.layout import META_FILE, resolve_checkpoint_dir
from dapo_megatron.checkpoint.manifest import (
    CHECKSUM_ALGORITHM,
    MANIFEST_FILE,
    FileProblem,
    ManifestError,
    find_problems,
    read_manifest,
)
from dapo_megatron.checkpoint.metadata import read_checkpoint_metadata
from dapo_megatron.distributed import this_rank

logger = logging.getLogger(__name__)


class CheckpointIntegrityError(RuntimeError):
    """A checkpoint's files do not match its manifest (names the checkpoint, the files, and
    the expected and found size or CRC)."""


UNVERIFIED = "nothing (no manifest)"


class Verify(enum.Enum):
    """What :func:`~dapo_megatron.checkpoint.training.load_checkpoint` checks before loading."""

    SIZES = "sizes"
    CHECKSUMS = "checksums"
    DONE = "done"  # the caller ran verify_checkpoint itself


@dataclass(frozen=True)
class Verification:
    """What :func:`verify_checkpoint` found: the same on every rank."""

    directory: Path
    checked: str  # "sizes", "sizes and crc32", or UNVERIFIED (written before manifests existed)
    problems: tuple[FileProblem, ...] = ()
    total_bytes: int = 0

    @property
    def intact(self) -> bool:
        return not self.problems

    @property
    def verified(self) -> bool:
        return self.checked != UNVERIFIED

    def warn_if_unverified(self, doing: str) -> None:
        """Rank 0 says when the checkpoint is used without a manifest to check it against."""
        if not self.verified and this_rank() == 0:
            logger.warning(
                "checkpoint %s has no manifest (written by an earlier version): %s it unverified", self.directory, doing
            )

    def reason(self, limit: int = 5) -> str:
        shown = "; ".join(str(p) for p in self.problems[:limit])
        more = len(self.problems) - limit
        return shown + (f"; and {more} more file(s)" if more > 0 else "")

    def error(self) -> CheckpointIntegrityError:
        return CheckpointIntegrityError(
            f"checkpoint {self.directory} is damaged ({self.checked} checked against its {MANIFEST_FILE}): "
            + self.reason()
        )


def verify_checkpoint(path: str | os.PathLike, *, checksums: bool) -> Verification:
    """Compare every file of a checkpoint with its manifest: sizes, and CRC-32s if ``checksums``.

    Collective when a process group exists (each rank reads a share of the files; every
    rank returns the same result); call it on every rank or none.  Does not raise for a
    damaged checkpoint (see :meth:`Verification.error`) so that ``resume=auto`` can fall
    back; only an unreadable ``dapo_checkpoint.json`` of a checkpoint without a manifest
    raises.
    """
    directory = resolve_checkpoint_dir(path)
    checked = f"sizes and {CHECKSUM_ALGORITHM}" if checksums else "sizes"
    if not (directory / MANIFEST_FILE).is_file():
        try:
            records_one = read_checkpoint_metadata(directory).get("manifest")
        except json.JSONDecodeError as exc:  # a damaged checkpoint, reported as such
            return Verification(directory, checked, (FileProblem(META_FILE, "valid JSON", str(exc)),))
        if records_one:
            missing = FileProblem(MANIFEST_FILE, "the manifest that dapo_checkpoint.json records", "no such file")
            return Verification(directory, checked, (missing,))
        return Verification(directory, UNVERIFIED)
    try:
        manifest = read_manifest(directory)
    except ManifestError as exc:
        return Verification(directory, checked, (FileProblem(MANIFEST_FILE, "a readable manifest", str(exc)),))
    problems = find_problems(directory, manifest, checksums=checksums)
    return Verification(directory, checked, tuple(problems), manifest.total_bytes)
