"""Checkpoint manifests: the size and CRC-32 of every file, written last, checked before a load.

Why: a truncated or corrupted shard otherwise surfaces as a bare ``EOFError`` deep inside
torch's DCP reader on one rank, after every rank has built its model and entered the
collective load; nothing names the file, nor says that an older checkpoint is intact.
Megatron-LM and torchtitan likewise write their metadata last and check it on load.

``manifest.json`` lists every file of a step directory (paths relative to it) with its
size in bytes and its CRC-32 (``zlib.crc32``, the checksum of gzip and zip: ~1 GB/s per
core and in the standard library; see bench/RESULTS.md for what it costs).  It is the
last file written into a checkpoint, before the directory is renamed into place and
before ``latest`` moves, so a checkpoint with a manifest was completely written.

Both computing and verifying are collective when a process group exists: file ``i`` is
read by rank ``i % world``, and the per-file results are combined with one
:func:`~dapo_megatron.distributed.all_max` over a float64 vector (sizes below 2**53 and
CRCs below 2**32 are exact), so every rank reaches the same verdict without gathering
Python objects, and a 32B checkpoint is read once in total, not once per rank.  Without a
process group one process reads everything.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dapo_megatron.checkpoint.files import atomic_write_text
from dapo_megatron.distributed import all_max, this_rank, world_size

__all__ = [
    "CHECKSUM_ALGORITHM",
    "MANIFEST_FILE",
    "FileProblem",
    "FileRecord",
    "Manifest",
    "ManifestError",
    "build_manifest",
    "crc32_file",
    "find_problems",
    "list_files",
    "read_manifest",
    "write_manifest",
]

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
CHECKSUM_ALGORITHM = "crc32"  # zlib.crc32
MANIFEST_VERSION = 1
_CHUNK = 8 << 20
# codes in the all_max vector: a real size/CRC is >= 0
_NOT_MINE = -3.0
_UNREADABLE = -2.0
_MISSING = -1.0


class ManifestError(ValueError):
    """``manifest.json`` exists but cannot be read as a manifest (names the file and field)."""


@dataclass(frozen=True)
class FileRecord:
    path: str  # relative to the step directory, '/'-separated
    size: int
    crc32: int


@dataclass(frozen=True)
class Manifest:
    files: tuple[FileRecord, ...]
    checksum: str = CHECKSUM_ALGORITHM
    version: int = MANIFEST_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class FileProblem:
    """One file that does not match the manifest (or an unreadable manifest)."""

    path: str
    expected: str
    actual: str

    def __str__(self) -> str:
        return f"{self.path}: expected {self.expected}, found {self.actual}"


@dataclass(frozen=True)
class _Measured:
    size: int | None  # None: missing
    crc32: int | None  # None: not computed, or unreadable
    unreadable_on_rank: int | None = None


def crc32_file(path: str | os.PathLike) -> int:
    """CRC-32 of a whole file, read in 8 MiB chunks into one reused buffer."""
    crc = 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return crc


def list_files(directory: str | os.PathLike) -> list[str]:
    """Every regular file under ``directory`` except the manifest, sorted, relative, '/'-separated."""
    root = Path(directory)
    out = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel != MANIFEST_FILE:
                out.append(rel)
    return sorted(out)


def _check_same_listing(names: Sequence[str], directory: Path) -> None:
    """Every rank must see the same file list, or the all_max vectors would not line up."""
    digest = zlib.crc32("\n".join(names).encode())
    hi_n, neg_lo_n, hi_d, neg_lo_d = all_max([len(names), -len(names), digest, -digest])
    if hi_n != -neg_lo_n or hi_d != -neg_lo_d:
        raise RuntimeError(
            f"ranks see different files in {directory} ({int(-neg_lo_n)} to {int(hi_n)} files): "
            "the checkpoint directory must be on a file system shared by every rank"
        )


def _measure(directory: Path, names: Sequence[str], *, checksums: bool) -> list[_Measured]:
    """Size (and CRC) of each file, each read by one rank; the same list on every rank (collective)."""
    rank, world = this_rank(), world_size()
    local = [_NOT_MINE] * (2 * len(names))
    for i in range(rank, len(names), world):
        path = directory / names[i]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            local[2 * i] = local[2 * i + 1] = _MISSING
            continue
        local[2 * i] = float(size)
        if checksums:
            try:
                local[2 * i + 1] = float(crc32_file(path))
            except OSError as exc:  # reported as "unreadable" by every rank; the cause is logged here
                logger.error("rank %d cannot read %s: %s", rank, path, exc)
                local[2 * i + 1] = _UNREADABLE
    merged = all_max(local)
    out = []
    for i in range(len(names)):
        size, crc = merged[2 * i], merged[2 * i + 1]
        if size == _MISSING:
            out.append(_Measured(None, None))
        elif crc == _UNREADABLE:
            out.append(_Measured(int(size), None, unreadable_on_rank=i % world))
        else:
            out.append(_Measured(int(size), int(crc) if checksums else None))
    return out


def build_manifest(directory: str | os.PathLike) -> Manifest:
    """Sizes and CRCs of every file now in ``directory``; collective (each rank reads its share).

    Raises:
        OSError: a file vanished or could not be read (names it).
    """
    directory = Path(directory)
    names = list_files(directory)
    _check_same_listing(names, directory)
    records = []
    for name, m in zip(names, _measure(directory, names, checksums=True), strict=True):
        if m.size is None:
            raise FileNotFoundError(f"{directory / name} vanished while its manifest was being written")
        if m.crc32 is None:
            raise OSError(f"{directory / name} could not be read back (see rank {m.unreadable_on_rank}'s log)")
        records.append(FileRecord(name, m.size, m.crc32))
    return Manifest(tuple(records))


def write_manifest(directory: str | os.PathLike, manifest: Manifest) -> Path:
    """Write ``manifest.json`` durably (temp file, fsync, rename; single writer: call on one rank)."""
    path = Path(directory) / MANIFEST_FILE
    body = {
        "version": manifest.version,
        "checksum": manifest.checksum,
        "total_bytes": manifest.total_bytes,
        "files": [{"path": f.path, "size": f.size, "crc32": f.crc32} for f in manifest.files],
    }
    atomic_write_text(path, json.dumps(body, indent=1))
    return path


def read_manifest(directory: str | os.PathLike) -> Manifest:
    """Parse ``manifest.json``.

    Raises:
        FileNotFoundError: no manifest.
        ManifestError: not JSON, or a field is missing or has the wrong type (names it).
    """
    path = Path(directory) / MANIFEST_FILE
    try:
        body = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(body, dict):
        raise ManifestError(f"{path}: expected a JSON object, got {type(body).__name__}")
    if body.get("checksum") != CHECKSUM_ALGORITHM:
        raise ManifestError(f"{path}: field 'checksum' is {body.get('checksum')!r}, expected {CHECKSUM_ALGORITHM!r}")
    files = body.get("files")
    if not isinstance(files, list):
        raise ManifestError(f"{path}: field 'files' must be a list, got {type(files).__name__}")
    records = []
    for i, entry in enumerate(files):
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("path"), str)
            and all(isinstance(entry.get(k), int) and entry[k] >= 0 for k in ("size", "crc32"))
        )
        if not ok:
            raise ManifestError(f"{path}: files[{i}] must have a string 'path' and integers 'size', 'crc32': {entry!r}")
        records.append(FileRecord(entry["path"], entry["size"], entry["crc32"]))
    return Manifest(tuple(records), version=int(body.get("version", MANIFEST_VERSION)))


def find_problems(directory: str | os.PathLike, manifest: Manifest, *, checksums: bool) -> list[FileProblem]:
    """Files of ``directory`` that differ from ``manifest``: missing, other size, or (``checksums``)
    other CRC; collective, the same list on every rank.  Files not in the manifest are ignored."""
    directory = Path(directory)
    names = [f.path for f in manifest.files]
    problems = []
    for rec, m in zip(manifest.files, _measure(directory, names, checksums=checksums), strict=True):
        if m.size is None:
            problems.append(FileProblem(rec.path, f"{rec.size} bytes", "no such file"))
        elif m.size != rec.size:
            problems.append(FileProblem(rec.path, f"{rec.size} bytes", f"{m.size} bytes"))
        elif m.unreadable_on_rank is not None:
            problems.append(
                FileProblem(rec.path, "a readable file", f"a read error (see rank {m.unreadable_on_rank}'s log)")
            )
        elif checksums and m.crc32 != rec.crc32:
            problems.append(FileProblem(rec.path, f"crc32 {rec.crc32:#010x}", f"crc32 {m.crc32:#010x}"))
    return problems
