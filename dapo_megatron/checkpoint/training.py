"""Saving and loading the Megatron actor's training state (megatron-core ``dist_checkpointing``, torch_dist).

The directory layout is in :mod:`~dapo_megatron.checkpoint.layout`, the model identity in
:mod:`~dapo_megatron.checkpoint.metadata`.

Why torch_dist: the format stores *global* tensors, so a checkpoint saved at one
TP x PP layout loads into any other (megatron reshards on load).  The vocab-parallel
tensors are padded to a multiple of ``128 * tp``, which differs between layouts;
megatron marks them ``allow_shape_mismatch`` and loads the overlapping rows, which is
correct because the padding rows are at the end and zero.

Why the commit protocol: a save writes into ``DIR/tmp-step_N``; once every rank has
finished, the size and CRC-32 of every file go into ``manifest.json``, written last
(:mod:`~dapo_megatron.checkpoint.manifest`); only then is the directory renamed to
``DIR/step_N`` and ``DIR/latest`` rewritten (temp file + ``os.replace``), and only after
that are checkpoints beyond ``keep_last`` deleted.  The trainer may defer the rename
(``commit=False``, :func:`commit_checkpoint`): the checkpoint, manifest included, is then
written while the engine sleeps and committed once the step's metrics are logged.  A
crash at any point leaves ``latest`` pointing at the previous complete checkpoint; stale
``tmp-*`` directories are ignored by :func:`find_latest` and removed by the next save.
A failed write on any rank (a full disk) is agreed by every rank before anyone moves on
(:func:`agree_on_failure`), so the save stops on all ranks with one
:class:`CheckpointSaveError` naming the path and the free space, instead of one rank
raising while the others wait in the next collective.

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

import functools
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

from dapo_megatron.actor.hf_loading import unwrap_model
from dapo_megatron.actor.offload import torch_optimizers
from dapo_megatron.checkpoint.agreement import agree_on_failure, barrier, rank0_phase
from dapo_megatron.checkpoint.files import fsync_dir
from dapo_megatron.checkpoint.layout import (
    EXTRA_STATE_FILE,
    RANK_STATE_DIR,
    complete_checkpoints,
    find_latest,
    point_latest,
    quarantine_checkpoint,
    resolve_checkpoint_dir,
    step_dir_name,
)
from dapo_megatron.checkpoint.manifest import build_manifest, write_manifest
from dapo_megatron.checkpoint.metadata import (
    LOADABLE_SHARDINGS,
    OPTIMIZER_SHARDING_METADATA,
    check_compatible,
    check_optimizer_layout,
    check_transformer_impl,
    read_checkpoint_metadata,
    write_checkpoint_metadata,
)
from dapo_megatron.checkpoint.verify import Verify, verify_checkpoint
from dapo_megatron.compat.megatron_checkpoint import (
    apply_writer_cpu_shim,
    single_rank_writes_deferred,
    sync_save_results_in_process,
)
from dapo_megatron.compat.megatron_optimizer import adam_step_passthrough, fully_reshardable_bucket_fix
from dapo_megatron.distributed import this_rank, world_size

logger = logging.getLogger(__name__)


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

    return rank0_phase(act, "set-aside of damaged checkpoints") or []


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
    if optimizer_sharding not in LOADABLE_SHARDINGS:
        raise ValueError(f"optimizer_sharding must be one of {LOADABLE_SHARDINGS}, got {optimizer_sharding!r}")
    apply_writer_cpu_shim()
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / f"tmp-{step_dir_name(step)}"
    tp, pp = _layout()

    def refuse_overwrite() -> None:
        if final.exists():
            raise FileExistsError(f"checkpoint {final} already exists")

    rank0_phase(refuse_overwrite, "preparation")
    agree = functools.partial(agree_on_failure, root=root, tmp=tmp, final=final)
    error: BaseException | None = None
    if this_rank() == 0:
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
    world = world_size()

    # 1. every rank writes its tensors (and its rank state); failures agreed, nobody left waiting
    deferred: list[BaseException] = []
    try:
        with single_rank_writes_deferred(deferred), sync_save_results_in_process():
            dist_checkpointing.save(sharded, str(tmp), sharded_strategy=_fully_parallel_save_strategy())
        if rank_state is not None:
            rank_dir = tmp / RANK_STATE_DIR
            rank_dir.mkdir(exist_ok=True)
            torch.save(dict(rank_state), rank_dir / f"rank_{this_rank():05d}.pt")
    except (Exception, CheckpointException) as exc:  # re-raised on every rank by agree()
        error = exc
    failures = ([error] if error is not None else []) + deferred
    for later in failures[1:]:  # agree() logs and chains the first
        logger.error("rank %d: saving checkpoint %s also failed", this_rank(), final.name, exc_info=later)
    agree(failures[0] if failures else None)

    # 2. rank 0: trainer state and dapo_checkpoint.json
    error = None
    if this_rank() == 0:
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
        if this_rank() == 0:
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
    if this_rank() == 0:
        try:
            os.rename(tmp, final)
            renamed = True
            fsync_dir(root)
            point_latest(root, final)
        except Exception as exc:  # re-raised on every rank by agree_on_failure()
            error = exc
    agree_on_failure(error, root=root, tmp=tmp, final=final, undo=(lambda: os.rename(final, tmp)) if renamed else None)

    # only now, with the new checkpoint written, read back and named by `latest`: drop old ones
    def cleanup() -> None:
        if pending.keep_last is not None:
            for old in complete_checkpoints(root)[: -pending.keep_last]:
                shutil.rmtree(old)
        for stale in root.glob("tmp-step_*"):
            shutil.rmtree(stale)

    rank0_phase(cleanup, f"clean-up after {final.name} was committed")
    barrier()
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
    for inner in torch_optimizers(optimizer):
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
    for inner in torch_optimizers(optimizer):
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
        verification.warn_if_unverified("loading")
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
    world = world_size()
    if saved_world != world:
        raise ValueError(f"rank_state of {directory} was saved by {saved_world} ranks, this job has {world}")
    # RNG states and other Python objects: not weights-only
    return torch.load(directory / RANK_STATE_DIR / f"rank_{this_rank():05d}.pt", map_location="cpu", weights_only=False)


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
