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

Why the commit protocol: a save writes into ``DIR/tmp-step_N``, renames it to
``DIR/step_N`` once every rank has finished, and only then rewrites ``DIR/latest``
(temp file + ``os.replace``); the trainer may defer that commit (``commit=False``,
:func:`commit_checkpoint`).  A crash at any point leaves ``latest`` pointing at the
previous complete checkpoint; stale ``tmp-*`` directories are ignored by
:func:`find_latest` and removed by the next save.

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
without either) are worked around on load, see :func:`_adam_step_passthrough` and
:func:`_restore_step_counters`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dapo_megatron.actor.hf_loading import unwrap_model
from dapo_megatron.actor.megatron_patches import fully_reshardable_bucket_fix
from dapo_megatron.distributed import any_true
from dapo_megatron.models import get_layout, model_type_of

__all__ = [
    "CheckpointMismatchError",
    "OPTIMIZER_SHARDING_METADATA",
    "apply_checkpoint_cpu_shim",
    "check_compatible",
    "check_optimizer_layout",
    "commit_checkpoint",
    "find_latest",
    "load_checkpoint",
    "load_rank_state",
    "model_metadata",
    "PendingCheckpoint",
    "read_checkpoint_metadata",
    "resolve_checkpoint_dir",
    "save_checkpoint",
    "step_dir_name",
    "write_checkpoint_metadata",
]

META_FILE = "dapo_checkpoint.json"
EXTRA_STATE_FILE = "extra_state.pt"
RANK_STATE_DIR = "rank_state"
LATEST_FILE = "latest"
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


# ----------------------------------------------------------------------------- CPU shim
_SHIM_APPLIED = False


def apply_checkpoint_cpu_shim() -> None:
    """Make megatron's checkpoint writer work on a CPU-only torch (no-op when CUDA exists).

    ``FileSystemWriterAsync.preload_tensors`` stages tensors to host memory with
    ``non_blocking=True`` and then calls ``torch.cuda.synchronize()``, which raises on
    a CPU build.  On CPU the tensors already live in host memory, so the wrapper simply
    forces ``non_blocking=False`` (no synchronise).  Kept here rather than in
    ``cpu_shims`` because only checkpointing needs it; applied lazily by every save.
    """
    global _SHIM_APPLIED
    if _SHIM_APPLIED or torch.cuda.is_available():
        return
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    original = FileSystemWriterAsync.preload_tensors

    def preload_tensors(write_buckets, non_blocking: bool = True):
        return original(write_buckets, non_blocking=False)

    FileSystemWriterAsync.preload_tensors = staticmethod(preload_tensors)
    _SHIM_APPLIED = True


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
) -> None:
    """Write ``dapo_checkpoint.json`` (single writer: call on one rank only)."""
    meta = {
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
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    return FullyParallelSaveStrategyWrapper(
        get_default_save_sharded_strategy("torch_dist"),
        parallel_state.get_data_parallel_group(with_context_parallel=True),
    )


def _transformer_impl(model: torch.nn.Module) -> str:
    return getattr(unwrap_model(model).config, "transformer_impl", "local")


def _layout() -> tuple[int, int]:
    from megatron.core import parallel_state

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
        commit: False writes everything into ``root/tmp-step_N`` and returns a
            :class:`PendingCheckpoint` for :func:`commit_checkpoint`: the trainer writes while the
            engine sleeps and commits once the step's metrics are logged, so a crash in between
            resumes from the previous checkpoint and redoes the whole step.

    Returns:
        The committed step directory (``commit=False``: the pending checkpoint).

    Raises:
        FileExistsError: ``root/step_N`` already exists (a checkpoint is never overwritten).
    """
    from megatron.core import dist_checkpointing

    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    if optimizer_sharding not in _LOADABLE_SHARDINGS:
        raise ValueError(f"optimizer_sharding must be one of {_LOADABLE_SHARDINGS}, got {optimizer_sharding!r}")
    apply_checkpoint_cpu_shim()
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / f"tmp-{step_dir_name(step)}"
    tp, pp = _layout()

    def prepare() -> None:
        if final.exists():
            raise FileExistsError(f"checkpoint {final} already exists")
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left over by a crashed save of the same step
            shutil.rmtree(tmp)
        tmp.mkdir()

    _rank0_phase(prepare, "preparation")

    sharded = {"model": _model_sharded_state_dict(model)}
    if optimizer is not None:
        with fully_reshardable_bucket_fix(optimizer):
            sharded["optimizer"] = optimizer.sharded_state_dict(
                sharded["model"], metadata={"distrib_optim_sharding_type": optimizer_sharding}
            )
    dist_checkpointing.save(sharded, str(tmp), sharded_strategy=_fully_parallel_save_strategy())
    world = dist.get_world_size() if dist.is_initialized() else 1
    if rank_state is not None:
        rank_dir = tmp / RANK_STATE_DIR
        rank_dir.mkdir(exist_ok=True)
        torch.save(dict(rank_state), rank_dir / f"rank_{_rank():05d}.pt")
    _barrier()

    def write_metadata() -> None:
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
        )

    _rank0_phase(write_metadata, "metadata")
    _barrier()
    pending = PendingCheckpoint(root=root, tmp=tmp, final=final, keep_last=keep_last)
    return commit_checkpoint(pending) if commit else pending


@dataclass(frozen=True)
class PendingCheckpoint:
    """A fully written checkpoint that ``latest`` does not name yet (see :func:`commit_checkpoint`)."""

    root: Path
    tmp: Path
    final: Path
    keep_last: int | None


def commit_checkpoint(pending: PendingCheckpoint) -> Path:
    """Rename the written checkpoint into place, point ``latest`` at it, prune; collective."""

    def commit() -> None:
        os.rename(pending.tmp, pending.final)
        _atomic_write_text(pending.root / LATEST_FILE, pending.final.name + "\n")
        if pending.keep_last is not None:
            for _, old in _complete_steps(pending.root)[: -pending.keep_last]:
                shutil.rmtree(old)
        for stale in pending.root.glob("tmp-step_*"):
            shutil.rmtree(stale)

    _rank0_phase(commit, "commit")
    _barrier()
    return pending.final


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


@contextlib.contextmanager
def _adam_step_passthrough():
    """Let megatron's model-space optimizer loaders run with torch's Adam (no Apex/TE).

    Root cause of the ``KeyError: 'step'`` that ``fully_reshardable`` loads raise without
    Apex/TE (megatron-core 0.16.1 and 0.19.2 alike): ``load_parameter_state_from_fully_reshardable``
    deliberately leaves ``step`` out of the tensors it hands over (the step count travels in
    the param groups and ``DistributedOptimizer.load_state_dict`` has already put it into the
    state), but ``DistributedOptimizer._set_main_param_and_optimizer_states`` copies *every
    key of the destination* state from that dict.  Apex/TE FusedAdam keep ``step`` in the
    param group, so their per-parameter state has no ``step`` and megatron's own runs never
    hit this; ``torch.optim.Adam`` keeps a per-parameter ``step`` tensor, hence the KeyError.

    For the duration of the load the method is wrapped so that a missing ``step`` is taken
    from the destination itself (a no-op copy), i.e. the value ``load_state_dict`` set from
    the param groups is kept, which is what megatron intends.  Only the plain (not
    precision-aware) branch copies destination keys, so only it is touched.  Restored on exit.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state[main_param].get("step")
            if torch.is_tensor(step):
                tensors = {**tensors, "step": step}
        return original(self, model_param, tensors)

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states
    try:
        yield
    finally:
        DistributedOptimizer._set_main_param_and_optimizer_states = original


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
) -> dict[str, Any] | None:
    """Load a checkpoint into this rank's model (and optimizer); collective.

    Args:
        path: a step directory, or a root (its ``latest`` checkpoint is loaded).
        model: this rank's megatron model, any TP x PP layout.
        hf_config: the HF config the model was built from; compared with the saved one.
        optimizer: the optimizer to restore; any layout for ``fully_reshardable`` state,
            the saved TP x PP for ``dp_reshardable`` state (see :func:`check_optimizer_layout`).

    Returns:
        The ``extra_state`` dict saved with the checkpoint, or None.

    Raises:
        CheckpointMismatchError: the checkpoint belongs to another model (names the keys).
        ValueError: an optimizer is requested but the checkpoint has none, or its state is
            layout-bound and the layout differs.
    """
    from megatron.core import dist_checkpointing

    directory = resolve_checkpoint_dir(path)
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
        with torch.no_grad(), _adam_step_passthrough():
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
