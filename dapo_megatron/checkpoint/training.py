"""Distributed checkpoints of the Megatron actor (megatron-core ``dist_checkpointing``, torch_dist).

Layout of a checkpoint root ``DIR``::

    DIR/step_00000010/            one checkpoint (a torch_dist directory)
        metadata.json, .metadata, __*.distcp, common.pt     megatron/torch DCP files
        dapo_checkpoint.json      model identity + HF config (see :func:`model_metadata`)
        extra_state.pt            optional trainer state (rank 0, torch.save)
        rank_state/rank_00001.pt  optional per-rank state (each rank, e.g. its RNG streams)
    DIR/latest                    text file: the name of the newest complete step dir

Why torch_dist: the format stores *global* tensors, so a checkpoint saved at one
TP x PP layout loads into any other (megatron reshards on load).  The vocab-parallel
tensors are padded to a multiple of ``128 * tp``, which differs between layouts;
megatron marks them ``allow_shape_mismatch`` and loads the overlapping rows, which is
correct because the padding rows are at the end and zero.

Why the commit protocol: a save writes into ``DIR/tmp-step_N``; once every rank has
finished, the size and CRC-32 of every file go into ``manifest.json``, written last
(:mod:`~dapo_megatron.actor.checkpoint_manifest`); only then is the directory renamed to
``DIR/step_N`` and ``DIR/latest`` rewritten (temp file + ``os.replace``), and only after
that are checkpoints beyond ``keep_last`` deleted.  The trainer may defer the rename
(``commit=False``, :func:`commit_checkpoint`): the checkpoint, manifest included, is then
written while the engine sleeps and committed once the step's metrics are logged.  A
crash at any point leaves ``latest`` pointing at the previous complete checkpoint; stale
``tmp-*`` directories are ignored by :func:`find_latest` and removed by the next save.
A failed write on any rank (a full disk) is agreed by every rank before anyone moves on
(:func:`_agree_on_failure`), so the save stops on all ranks with one
:class:`CheckpointSaveError` naming the path and the free space, instead of one rank
raising while the others wait in the next collective.

Why verify before loading: :func:`verify_checkpoint` compares every file with the
manifest (sizes always, CRCs on request) before the collective load starts, so a
truncated or corrupted shard is named instead of surfacing as a bare ``EOFError`` from
torch's DCP reader on one rank.  Checkpoints written before manifests existed have none
and no ``"manifest": true`` in ``dapo_checkpoint.json``: they load unverified, with a
warning (refusing them would strand every existing run); one that records a manifest but
has lost it is damaged.

Why ``fully_reshardable`` for the distributed optimizer's state (``optimizer=``): it
stores every Adam moment and fp32 main weight in *model space* (one tensor per model
parameter, keyed like the parameter), so like the weights it loads into any TP x PP x DP
layout.  Megatron's alternatives do not fit: ``dp_reshardable`` stores the optimizer's
internal flat buckets, which only reshard across DP; ``fully_sharded_model_space`` (the
default) is deprecated and fails with "flattened_range is not supported" on this stack.
The price of ``fully_reshardable``: a save all-gathers each model-parallel shard's
optimizer state over DP into host memory (12 bytes per parameter of the shard, on every
DP rank), and a load reads that whole shard state on every rank before slicing it.
``dp_reshardable`` state (earlier versions' format, still written on request) loads only
at the TP x PP it was saved with (:func:`check_optimizer_layout`).  The learning-rate schedule
is a pure function of the actor's update count (trainer state, ``extra_state``).

Two megatron defects with torch's Adam (no Apex/TE: the CPU stack, or a GPU install
without either) are worked around on load: a patch for the duration of the load
(:func:`dapo_megatron.compat.megatron_optimizer.adam_step_passthrough`) and
:func:`_restore_step_counters` after it.  Every patch of megatron's save and load lives in
:mod:`dapo_megatron.compat` (docs/COMPAT.md).
"""

from __future__ import annotations

import enum
import functools
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

from dapo_megatron.actor.checkpoint_manifest import (
    CHECKSUM_ALGORITHM,
    MANIFEST_FILE,
    FileProblem,
    ManifestError,
    build_manifest,
    find_problems,
    read_manifest,
    write_manifest,
)
from dapo_megatron.actor.hf_loading import unwrap_model
from dapo_megatron.compat.megatron_checkpoint import apply_writer_cpu_shim, single_rank_writes_deferred
from dapo_megatron.compat.megatron_optimizer import adam_step_passthrough, fully_reshardable_bucket_fix
from dapo_megatron.distributed import all_max, any_true
from dapo_megatron.models import get_layout, model_type_of

logger = logging.getLogger(__name__)

__all__ = [
    "ActorCheckpoints",
    "CheckpointIntegrityError",
    "CheckpointMismatchError",
    "CheckpointSaveError",
    "Verification",
    "Verify",
    "OPTIMIZER_SHARDING_METADATA",
    "check_compatible",
    "check_optimizer_layout",
    "commit_checkpoint",
    "complete_checkpoints",
    "find_latest",
    "load_checkpoint",
    "load_rank_state",
    "model_metadata",
    "PendingCheckpoint",
    "quarantine_checkpoint",
    "read_checkpoint_metadata",
    "resolve_checkpoint_dir",
    "save_checkpoint",
    "set_aside_damaged",
    "step_dir_name",
    "verify_checkpoint",
    "write_checkpoint_metadata",
]

META_FILE = "dapo_checkpoint.json"
EXTRA_STATE_FILE = "extra_state.pt"
RANK_STATE_DIR = "rank_state"
LATEST_FILE = "latest"
QUARANTINE_PREFIX = "damaged-"
FORMAT_VERSION = 1
# what save_checkpoint passes to megatron's DistributedOptimizer.sharded_state_dict
OPTIMIZER_SHARDING_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
# sharding types this module loads, and the ones bound to the TP x PP layout of the save
_LOADABLE_SHARDINGS = ("fully_reshardable", "dp_reshardable")
_LAYOUT_BOUND_SHARDINGS = ("dp_reshardable",)
_STEP_RE = re.compile(r"^step_(\d+)$")

# keys of model_metadata() compared on load: a mismatch means "another model"
IDENTITY_KEYS = (
    "architecture",
    "model_type",
    "hidden_size",
    "num_layers",
    "vocab_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "tie_word_embeddings",
    "qkv_bias",
    "qk_norm",
)


class CheckpointMismatchError(ValueError):
    """The checkpoint was written for a different model than the one being loaded."""


class CheckpointIntegrityError(RuntimeError):
    """A checkpoint's files do not match its manifest (names the checkpoint, the files, and
    the expected and found size or CRC)."""


class CheckpointSaveError(RuntimeError):
    """A save failed on some rank; raised on every rank, ``latest`` unchanged."""


# ----------------------------------------------------------------------------- metadata
def model_metadata(hf_config) -> dict[str, Any]:
    """Identity of the model (compared on load) plus the full HF config (used by export).

    Raises:
        ValueError: unsupported architecture (from :func:`dapo_megatron.models.get_layout`).
    """
    layout = get_layout(hf_config, tp=1)
    archs = list(getattr(hf_config, "architectures", None) or [])
    return {
        "architecture": archs[0] if archs else None,
        "model_type": model_type_of(hf_config),
        "hidden_size": layout.hidden_size,
        "num_layers": layout.num_layers,
        "vocab_size": layout.vocab_size,
        "num_attention_heads": layout.num_attention_heads,
        "num_key_value_heads": layout.num_query_groups,
        "head_dim": layout.head_dim,
        "intermediate_size": layout.ffn_hidden_size,
        "tie_word_embeddings": layout.tie_word_embeddings,
        "qkv_bias": layout.qkv_bias,
        "qk_norm": layout.qk_norm,
    }


def check_compatible(saved: Mapping[str, Any], hf_config, *, where: str = "checkpoint") -> None:
    """Raise :class:`CheckpointMismatchError` naming every identity key that differs."""
    want = model_metadata(hf_config)
    saved_model = saved.get("model", saved)
    diffs = [
        f"{k}: checkpoint has {saved_model.get(k)!r}, model has {want[k]!r}"
        for k in IDENTITY_KEYS
        if saved_model.get(k) != want[k]
    ]
    if diffs:
        raise CheckpointMismatchError(f"{where} belongs to another model: " + "; ".join(diffs))


def check_transformer_impl(saved: Mapping[str, Any], transformer_impl: str, *, where: str = "checkpoint") -> None:
    """Refuse a checkpoint written by the other layer implementation, naming the setting.

    The Transformer-Engine spec fuses the two pre-norms into the following linears, so its
    checkpoint keys (``linear_qkv.layer_norm_weight``) are not the local spec's
    (``input_layernorm.weight``): megatron's load would fail on missing keys.  Checkpoints
    without the field were written before it existed, by CPU runs: the local spec.
    """
    impl = saved.get("transformer_impl", "local")
    if impl != transformer_impl:
        raise CheckpointMismatchError(
            f"{where} was written by a {impl} model and this one is {transformer_impl} "
            f"(actor.transformer_impl): the two layer specs name the pre-norm weights differently; "
            f"set actor.transformer_impl={impl}, or start from the HF weights (actor.model_path)"
        )


def check_optimizer_layout(saved: Mapping[str, Any], tp: int, pp: int, *, where: str = "checkpoint") -> str:
    """The optimizer sharding type of ``saved`` (``dapo_checkpoint.json``), checked against a TP x PP load.

    ``fully_reshardable`` state loads at any layout; ``dp_reshardable`` state (earlier
    versions' default) only at the TP x PP it was saved with.

    Raises:
        ValueError: no optimizer state, an unknown sharding type, or a layout-bound state at
            another layout (the message says how to proceed).
    """
    if not saved.get("has_optimizer"):
        raise ValueError(f"{where} has no optimizer state (has_optimizer=false)")
    sharding = (saved.get("optimizer_sharding") or {}).get("distrib_optim_sharding_type")
    if sharding not in _LOADABLE_SHARDINGS:
        raise ValueError(
            f"{where}: optimizer_sharding.distrib_optim_sharding_type={sharding!r} is not one of {_LOADABLE_SHARDINGS}"
        )
    layout = saved.get("saved_layout") or {}
    if sharding in _LAYOUT_BOUND_SHARDINGS and (layout.get("tp"), layout.get("pp")) != (tp, pp):
        raise ValueError(
            f"{where} holds optimizer state in megatron's {sharding!r} format, saved at tp={layout.get('tp')} "
            f"pp={layout.get('pp')}; that format only loads at the same tensor/pipeline layout (now tp={tp} pp={pp}). "
            "Resume once at the saved layout and save again (new checkpoints use 'fully_reshardable', which loads "
            "at any layout), or load the model only"
        )
    return sharding


def write_checkpoint_metadata(
    directory: str | os.PathLike,
    hf_config,
    *,
    step: int | None,
    tp: int,
    pp: int,
    has_optimizer: bool,
    has_extra_state: bool,
    rank_state_world_size: int | None = None,
    optimizer_sharding: str = OPTIMIZER_SHARDING_METADATA["distrib_optim_sharding_type"],
    transformer_impl: str = "local",
    manifest: bool = False,
    run_config: Mapping[str, Any] | None = None,
) -> None:
    """Write ``dapo_checkpoint.json`` (single writer: call on one rank only).

    ``manifest=True`` promises a ``manifest.json`` written after this file: a checkpoint that
    records one and lacks it is damaged, not legacy.  ``run_config`` (the trainer's whole
    configuration, JSON types) lets a resume say which settings changed.
    """
    meta = {
        "manifest": manifest,
        "run_config": dict(run_config) if run_config is not None else None,
        "transformer_impl": transformer_impl,
        "format_version": FORMAT_VERSION,
        "step": step,
        "saved_layout": {"tp": tp, "pp": pp},
        "has_optimizer": has_optimizer,
        "optimizer_sharding": {"distrib_optim_sharding_type": optimizer_sharding} if has_optimizer else None,
        "has_extra_state": has_extra_state,
        "rank_state_world_size": rank_state_world_size,
        "model": model_metadata(hf_config),
        "hf_config": hf_config.to_dict(),
    }
    _atomic_write_text(Path(directory) / META_FILE, json.dumps(meta, indent=2, sort_keys=True, default=str))


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """``dapo_checkpoint.json`` of a checkpoint (a step dir or a root with ``latest``)."""
    directory = resolve_checkpoint_dir(path)
    with open(directory / META_FILE) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- paths
def step_dir_name(step: int) -> str:
    """``step_00000042``: zero-padded so lexical and numeric order agree."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step_{step:08d}"


def _complete_steps(root: Path) -> list[tuple[int, Path]]:
    out = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_dir() and (p / META_FILE).is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


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
    steps = _complete_steps(root)
    return steps[-1][1] if steps else None


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


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (the directory entry, not only the files)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pointer_text(root: Path) -> str:
    """What ``latest`` names now, for messages."""
    pointer = root / LATEST_FILE
    return f"`latest` still names {pointer.read_text().strip()}" if pointer.is_file() else "no `latest` was written yet"


# ----------------------------------------------------------------------------- verification
UNVERIFIED = "nothing (no manifest)"


class Verify(enum.Enum):
    """What :func:`load_checkpoint` checks before loading."""

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


def set_aside_damaged(root: str | os.PathLike, damaged: list[Path], resume_from: Path) -> list[Path]:
    """Collective: rank 0 renames each damaged checkpoint (:func:`quarantine_checkpoint`) and
    points ``latest`` at ``resume_from``; returns the new names (on rank 0; empty elsewhere).

    Raises:
        OSError: a rename failed (on rank 0; the other ranks raise RuntimeError).
    """

    def act() -> list[Path]:
        moved = [quarantine_checkpoint(d) for d in damaged]
        point_latest(root, resume_from)
        return moved

    return _rank0_phase(act, "set-aside of damaged checkpoints") or []


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Every ``step_N`` directory with a ``dapo_checkpoint.json``, oldest first."""
    return [p for _, p in _complete_steps(Path(root))]


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
    _fsync_dir(directory.parent)
    return target


def point_latest(root: str | os.PathLike, directory: str | os.PathLike) -> None:
    """Rewrite ``root/latest`` to name ``directory`` (single writer: rank 0)."""
    _atomic_write_text(Path(root) / LATEST_FILE, Path(directory).name + "\n")


# ----------------------------------------------------------------------------- collectives
def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank0_phase(fn, what: str) -> Any:
    """Run ``fn`` on rank 0; every rank raises if it failed (no rank is left in a barrier)."""
    result, error = None, None
    if _rank() == 0:
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


def _agree_on_failure(error: BaseException | None, *, root: Path, tmp: Path, final: Path, undo=None) -> None:
    """Collective: if ``error`` is set on any rank, every rank raises the same :class:`CheckpointSaveError`.

    One ``all_max`` carries, per rank, the errno of its failure (or "unknown"; see
    :func:`_failure_codes`), rank 0's free-space reading and whether any rank failed, so the
    message names every failing rank and its error on every rank.  Rank 0 measures the free
    space (the cause, usually) before it runs ``undo`` (if the failure came after the
    rename) and removes the partial directory, so that a re-run finds the disk as it was
    before the save and ``latest`` still names the previous checkpoint.  A failing rank
    logs its own exception with the traceback first.
    """
    rank = _rank()
    world = dist.get_world_size() if dist.is_initialized() else 1
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
    _barrier()

    def cause(r: int, code: int) -> str:
        if code != _UNKNOWN_FAILURE:
            return f"rank {r}: [Errno {code}] {os.strerror(code)}"
        if r == rank and error is not None:
            return f"rank {r}: {type(error).__name__}: {error}"
        return f"rank {r}: an error that is not an OSError (see that rank's log)"

    causes = ", ".join(cause(r, c) for r, c in sorted(failed.items()))
    message = (
        f"saving checkpoint {final.name} into {tmp} failed ({causes}); "
        f"{_format_bytes(free)} free on the file system of {root} when it failed; {_pointer_text(root)}"
        + "".join(f"; {n}" for n in notes)
    )
    raise CheckpointSaveError(message) from error


def _format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- save / load
def _model_sharded_state_dict(model: torch.nn.Module) -> dict:
    inner = unwrap_model(model)
    if not hasattr(inner, "sharded_state_dict"):
        raise TypeError(f"model {type(inner).__name__} has no sharded_state_dict (expected a megatron GPTModel)")
    return inner.sharded_state_dict()


def _fully_parallel_save_strategy():
    """torch_dist save spread over the data-parallel replicas (Megatron-LM's ``--ckpt-fully-parallel-save``).

    Without it a tensor replicated over DP is written by its replica 0 only: at 32B the model's
    bytes go through the TP x PP ranks of DP rank 0 while every other rank waits.  The wrapper
    exchanges metadata only (no tensor data) and assigns each replicated shard to one rank of the
    DP group, balancing the bytes.  Loading keeps the default strategy: megatron's fully parallel
    load stages every exchanged tensor on the GPU, next to an engine that is awake at resume.
    """
    return FullyParallelSaveStrategyWrapper(
        get_default_save_sharded_strategy("torch_dist"),
        parallel_state.get_data_parallel_group(with_context_parallel=True),
    )


def _transformer_impl(model: torch.nn.Module) -> str:
    return getattr(unwrap_model(model).config, "transformer_impl", "local")


def _layout() -> tuple[int, int]:
    return (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
    )


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    hf_config,
    *,
    optimizer=None,
    extra_state: Mapping[str, Any] | None = None,
    rank_state: Mapping[str, Any] | None = None,
    keep_last: int | None = None,
    optimizer_sharding: str = OPTIMIZER_SHARDING_METADATA["distrib_optim_sharding_type"],
    commit: bool = True,
    run_config: Mapping[str, Any] | None = None,
) -> Path | PendingCheckpoint:
    """Save this rank's model shard (and optimizer state) as ``root/step_N``; collective.

    Args:
        root: checkpoint root directory (created if missing).
        step: training step; the directory is ``step_{step:08d}``.
        model: this rank's megatron model (wrappers with ``.module`` are unwrapped).
        hf_config: the HF config the model was built from (stored, and checked on load).
        optimizer: a megatron optimizer (``get_megatron_optimizer``) or None.
        extra_state: picklable trainer state (step, sampler, buffer, RNG, ...), written by
            rank 0 with ``torch.save``; must be identical on every rank.
        rank_state: picklable state that differs per rank (e.g. each rank's RNG streams),
            written by every rank; pass it on all ranks or on none.  Read back with
            :func:`load_rank_state` (same world size only).
        keep_last: keep only the newest ``keep_last`` complete checkpoints (None = all).
        optimizer_sharding: megatron's ``distrib_optim_sharding_type``.  The default
            ``fully_reshardable`` loads at any layout; ``dp_reshardable`` saves without the
            DP all-gather (no extra host memory) but loads only at the same TP x PP.
        commit: False writes everything into ``root/tmp-step_N`` (manifest included) and returns
            a :class:`PendingCheckpoint` for :func:`commit_checkpoint`: the trainer writes while
            the engine sleeps and commits once the step's metrics are logged, so a crash in
            between resumes from the previous checkpoint and redoes the whole step.
        run_config: the run's configuration (JSON types), stored so a resume can list what changed.

    Returns:
        The committed step directory (``commit=False``: the pending checkpoint).

    Raises:
        FileExistsError: ``root/step_N`` already exists (a checkpoint is never overwritten).
        CheckpointSaveError: a write failed on some rank (on every rank; ``latest`` unchanged,
            the partial directory removed, nothing older deleted).
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    if optimizer_sharding not in _LOADABLE_SHARDINGS:
        raise ValueError(f"optimizer_sharding must be one of {_LOADABLE_SHARDINGS}, got {optimizer_sharding!r}")
    apply_writer_cpu_shim()
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / f"tmp-{step_dir_name(step)}"
    tp, pp = _layout()

    def refuse_overwrite() -> None:
        if final.exists():
            raise FileExistsError(f"checkpoint {final} already exists")

    _rank0_phase(refuse_overwrite, "preparation")
    agree = functools.partial(_agree_on_failure, root=root, tmp=tmp, final=final)
    error: BaseException | None = None
    if _rank() == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left over by a crashed save of the same step
                shutil.rmtree(tmp)
            tmp.mkdir()
        except OSError as exc:  # re-raised on every rank by agree()
            error = exc
    agree(error)

    sharded = {"model": _model_sharded_state_dict(model)}
    if optimizer is not None:
        with fully_reshardable_bucket_fix(optimizer):
            sharded["optimizer"] = optimizer.sharded_state_dict(
                sharded["model"], metadata={"distrib_optim_sharding_type": optimizer_sharding}
            )
    world = dist.get_world_size() if dist.is_initialized() else 1

    # 1. every rank writes its tensors (and its rank state); failures agreed, nobody left waiting
    deferred: list[BaseException] = []
    try:
        with single_rank_writes_deferred(deferred):
            dist_checkpointing.save(sharded, str(tmp), sharded_strategy=_fully_parallel_save_strategy())
        if rank_state is not None:
            rank_dir = tmp / RANK_STATE_DIR
            rank_dir.mkdir(exist_ok=True)
            torch.save(dict(rank_state), rank_dir / f"rank_{_rank():05d}.pt")
    except (Exception, CheckpointException) as exc:  # re-raised on every rank by agree()
        error = exc
    failures = ([error] if error is not None else []) + deferred
    for later in failures[1:]:  # agree() logs and chains the first
        logger.error("rank %d: saving checkpoint %s also failed", _rank(), final.name, exc_info=later)
    agree(failures[0] if failures else None)

    # 2. rank 0: trainer state and dapo_checkpoint.json
    error = None
    if _rank() == 0:
        try:
            if rank_state is not None:
                found = len(list((tmp / RANK_STATE_DIR).glob("rank_*.pt")))
                if found != world:
                    raise RuntimeError(f"rank_state written by {found} of {world} ranks (pass it on every rank)")
            if extra_state is not None:
                torch.save(dict(extra_state), tmp / EXTRA_STATE_FILE)
            write_checkpoint_metadata(
                tmp,
                hf_config,
                step=step,
                tp=tp,
                pp=pp,
                has_optimizer=optimizer is not None,
                has_extra_state=extra_state is not None,
                rank_state_world_size=world if rank_state is not None else None,
                optimizer_sharding=optimizer_sharding,
                transformer_impl=_transformer_impl(model),
                manifest=True,
                run_config=run_config,
            )
        except Exception as exc:  # re-raised on every rank by agree()
            error = exc
    agree(error)

    # 3. the manifest, last: every file read back whole (each rank its share) for its size and
    #    CRC, which is also the check that what was written can be read
    error = None
    try:
        manifest = build_manifest(tmp)
        if _rank() == 0:
            write_manifest(tmp, manifest)
    except Exception as exc:  # re-raised on every rank by agree()
        error = exc
    agree(error)
    pending = PendingCheckpoint(root=root, tmp=tmp, final=final, keep_last=keep_last)
    return commit_checkpoint(pending) if commit else pending


@dataclass(frozen=True)
class PendingCheckpoint:
    """A fully written checkpoint, manifest included, that ``latest`` does not name yet
    (see :func:`commit_checkpoint`)."""

    root: Path
    tmp: Path
    final: Path
    keep_last: int | None


def commit_checkpoint(pending: PendingCheckpoint) -> Path:
    """Rename the written checkpoint into place, point ``latest`` at it, then prune; collective.

    Raises:
        CheckpointSaveError: the rename or ``latest`` failed (on every rank; the checkpoint is
            moved back and removed, ``latest`` unchanged, nothing older deleted).
    """
    root, tmp, final = pending.root, pending.tmp, pending.final
    error: BaseException | None = None
    renamed = False
    if _rank() == 0:
        try:
            os.rename(tmp, final)
            renamed = True
            _fsync_dir(root)
            _atomic_write_text(root / LATEST_FILE, final.name + "\n")
        except Exception as exc:  # re-raised on every rank by _agree_on_failure()
            error = exc
    _agree_on_failure(error, root=root, tmp=tmp, final=final, undo=(lambda: os.rename(final, tmp)) if renamed else None)

    # only now, with the new checkpoint written, read back and named by `latest`: drop old ones
    def cleanup() -> None:
        if pending.keep_last is not None:
            for _, old in _complete_steps(root)[: -pending.keep_last]:
                shutil.rmtree(old)
        for stale in root.glob("tmp-step_*"):
            shutil.rmtree(stale)

    _rank0_phase(cleanup, f"clean-up after {final.name} was committed")
    _barrier()
    return final


@torch.no_grad()
def _materialize_optimizer_state(optimizer) -> None:
    """Give a fresh (never stepped) optimizer its state tensors so megatron can describe them.

    The distributed optimizer builds its sharded state dict from ``state_dict()``, which
    needs each parameter's Adam ``step``/moments to exist (megatron asserts on them with
    the torch Adam fallback).  Megatron's own remedy (``_init_optimizer_states_with_dummy_values``)
    steps on zero gradients; we do the same with lr and weight decay set to 0 for that
    step, so no parameter moves.  The loaded checkpoint then overwrites the moments; the
    step counters are rebuilt by :func:`_restore_step_counters`.
    """
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = opt.optimizer
        params = [p for g in inner.param_groups for p in g["params"] if p.numel() > 0]
        if all(len(inner.state.get(p, {})) > 0 for p in params):
            continue
        saved = [(g["lr"], g.get("weight_decay", 0.0)) for g in inner.param_groups]
        for g in inner.param_groups:
            g["lr"], g["weight_decay"] = 0.0, 0.0
        grads = [p.grad for p in params]
        for p in params:
            p.grad = torch.zeros_like(p)
        inner.step()
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad
        for g, (lr, wd) in zip(inner.param_groups, saved, strict=True):
            g["lr"], g["weight_decay"] = lr, wd


def _restore_step_counters(optimizer) -> None:
    """Give every parameter its own, correct Adam ``step`` after a distributed-optimizer load.

    Without Apex/TE (torch Adam fallback, e.g. on CPU) megatron's (0.16, 0.19)
    ``DistributedOptimizer.load_state_dict`` stores the saved step count in each param
    group (``group["step"]``) but hands *one* ``step`` tensor object to all parameters,
    which torch Adam then increments once per parameter; with ``dp_reshardable`` state the
    parameter loader then also copies the step of the already-initialised state (our
    :func:`_materialize_optimizer_state`) over the saved one.  Both break the bias
    correction of the next step; found by the bit-exact resume test.  The per-parameter
    counters are rebuilt from the group's value.
    """
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state.get(p)
                if not state or not torch.is_tensor(state.get("step")):
                    continue
                if "step" in group:
                    state["step"] = torch.tensor(float(group["step"]), dtype=state["step"].dtype)
                else:
                    state["step"] = state["step"].clone()


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    hf_config,
    *,
    optimizer=None,
    verify: Verify = Verify.SIZES,
) -> dict[str, Any] | None:
    """Load a checkpoint into this rank's model (and optimizer); collective.

    Args:
        path: a step directory, or a root (its ``latest`` checkpoint is loaded).
        model: this rank's megatron model, any TP x PP layout.
        hf_config: the HF config the model was built from; compared with the saved one.
        optimizer: the optimizer to restore; any layout for ``fully_reshardable`` state,
            the saved TP x PP for ``dp_reshardable`` state (see :func:`check_optimizer_layout`).
        verify: what to compare with the manifest before the collective load starts (sizes
            cost one ``stat`` per file; CRCs one read of the checkpoint, split over the ranks);
            ``Verify.DONE`` when the caller has just run :func:`verify_checkpoint`.

    Returns:
        The ``extra_state`` dict saved with the checkpoint, or None.

    Raises:
        CheckpointIntegrityError: a file differs from the manifest (names file, expected, found).
        CheckpointMismatchError: the checkpoint belongs to another model (names the keys).
        ValueError: an optimizer is requested but the checkpoint has none, or its state is
            layout-bound and the layout differs.
    """
    directory = resolve_checkpoint_dir(path)
    if verify is not Verify.DONE:
        verification = verify_checkpoint(directory, checksums=verify is Verify.CHECKSUMS)
        if not verification.intact:
            raise verification.error()
        if not verification.verified and _rank() == 0:
            logger.warning(
                "checkpoint %s has no %s (written by an earlier version): loading it unverified",
                directory,
                MANIFEST_FILE,
            )
    meta = read_checkpoint_metadata(directory)
    check_compatible(meta, hf_config, where=f"checkpoint {directory}")
    check_transformer_impl(meta, _transformer_impl(model), where=f"checkpoint {directory}")
    sharded = {"model": _model_sharded_state_dict(model)}
    if optimizer is not None:
        sharding = check_optimizer_layout(meta, *_layout(), where=f"checkpoint {directory}")
        _materialize_optimizer_state(optimizer)
        with fully_reshardable_bucket_fix(optimizer):
            sharded["optimizer"] = optimizer.sharded_state_dict(
                sharded["model"], is_loading=True, metadata={"distrib_optim_sharding_type": sharding}
            )
    loaded = dist_checkpointing.load(sharded, str(directory))
    inner = unwrap_model(model)
    inner.load_state_dict(loaded["model"], strict=True)
    if optimizer is not None:
        with torch.no_grad(), adam_step_passthrough():
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_step_counters(optimizer)
    extra = directory / EXTRA_STATE_FILE
    if meta.get("has_extra_state"):
        if not extra.is_file():
            raise FileNotFoundError(f"checkpoint {directory} records extra state but {extra} is missing")
        # trainer state holds RNG states, numpy objects, dataclasses: not weights-only
        return torch.load(extra, map_location="cpu", weights_only=False)
    return None


def load_rank_state(path: str | os.PathLike) -> dict[str, Any] | None:
    """This rank's ``rank_state`` from a checkpoint (None if it was saved without one).

    Raises:
        ValueError: the world size differs from the one that saved it (per-rank state of
            another layout has no meaningful owner).
    """
    directory = resolve_checkpoint_dir(path)
    saved_world = read_checkpoint_metadata(directory).get("rank_state_world_size")
    if saved_world is None:
        return None
    world = dist.get_world_size() if dist.is_initialized() else 1
    if saved_world != world:
        raise ValueError(f"rank_state of {directory} was saved by {saved_world} ranks, this job has {world}")
    # RNG states and other Python objects: not weights-only
    return torch.load(directory / RANK_STATE_DIR / f"rank_{_rank():05d}.pt", map_location="cpu", weights_only=False)


class ActorCheckpoints:
    """One actor's checkpoints under ``root``, with the trainer's state beside them: the
    :class:`~dapo_megatron.parts.Checkpoints` part of the trainer (all calls collective).

    ``actor`` has ``model`` and ``optimizer`` (:class:`~dapo_megatron.actor.actor.MegatronActor`);
    ``run_config`` is stored with every save (a resume lists what changed since).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        actor,
        hf_config,
        *,
        keep_last: int | None,
        run_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.root = Path(root)
        self.actor, self.hf_config = actor, hf_config
        self.keep_last, self.run_config = keep_last, run_config

    def load(self, path: str | os.PathLike) -> dict[str, Any] | None:
        """Load a checkpoint whose files were verified when it was chosen; returns its trainer state."""
        return load_checkpoint(
            path, self.actor.model, self.hf_config, optimizer=self.actor.optimizer, verify=Verify.DONE
        )

    def save(self, step: int, extra_state: Mapping[str, Any], *, commit: bool) -> Path | PendingCheckpoint:
        return save_checkpoint(
            self.root,
            step,
            self.actor.model,
            self.hf_config,
            optimizer=self.actor.optimizer,
            extra_state=extra_state,
            keep_last=self.keep_last,
            commit=commit,
            run_config=self.run_config,
        )

    def commit(self, pending: PendingCheckpoint) -> Path:
        return commit_checkpoint(pending)

    def latest(self) -> Path | None:
        return find_latest(self.root)
