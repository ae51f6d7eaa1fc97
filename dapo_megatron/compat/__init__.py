"""Every monkeypatch of a third-party package, in one quarantined package.

Why one package: a patch of someone else's code is a bet that the code still looks the way
it did when the patch was measured.  Here each bet is written down in :data:`PATCHES`: what
it replaces, the version range it was measured on, what happens outside that range, and the
test that runs the upstream code unpatched and shows the bug is still there (that test fails
once upstream fixes it, which is the signal to delete the patch).  docs/COMPAT.md has one
section per patch with the measured root cause.  tests/unit/test_compat.py keeps the registry
complete and checks that no module outside this package patches a third party.

Importing this package imports no third-party code; a patch module imports what it patches at
its top and patches nothing until its function is called.  :func:`guard` checks the measured
range, not the names: setup.py pins megatron-core to the range the guards accept, and a release
that moved a patched module fails at that import (tests/unit/test_compat.py names each target).
"""

from __future__ import annotations

import enum
import importlib
import re
import warnings
from dataclasses import dataclass

__all__ = [
    "PATCHES",
    "OutsideRange",
    "Patch",
    "UnverifiedPatchWarning",
    "UnverifiedVersionError",
    "guard",
    "installed_version",
    "patch",
    "version_in_range",
]

# measured ranges below are [low, high): megatron-core as the project supports it (setup.py)
_MCORE = ("0.16.1", "0.20")
_MCORE_MEASURED = ("0.16.1", "0.19.2")


class OutsideRange(enum.Enum):
    """What a patch does on an installed version outside its measured range."""

    REFUSE = "refuse"  # the patch could corrupt results if upstream moved: raise instead
    WARN = "warn"  # the patch only changes how a failure surfaces, or is a no-op if fixed


class UnverifiedVersionError(RuntimeError):
    """A patch that refuses unmeasured versions was asked to apply to one."""


class UnverifiedPatchWarning(UserWarning):
    """A patch that tolerates unmeasured versions is applied to one."""


@dataclass(frozen=True)
class Patch:
    """One monkeypatch of a third-party package (see docs/COMPAT.md, section ``name``)."""

    name: str
    module: str  # the compat module that applies it
    targets: tuple[str, ...]  # dotted module.attribute it replaces
    outside: OutsideRange
    why: str
    needed_test: str  # pytest node id that fails once upstream no longer needs the patch
    package: str = "megatron.core"  # the importable package whose ``__version__`` is guarded
    versions: tuple[str, str] = _MCORE  # [low, high): the range it applies to without complaint
    measured: tuple[str, ...] = _MCORE_MEASURED  # versions on which the bug and the fix were measured
    cpu_only: bool = False
    workaround: str = ""  # what a user can do when the patch refuses


def _cpu(name: str, targets: tuple[str, ...], why: str) -> Patch:
    return Patch(
        name=name,
        module="dapo_megatron.compat.megatron_cpu",
        targets=targets,
        outside=OutsideRange.REFUSE,
        why=why,
        needed_test=f"tests/unit/test_compat_needed.py::test_cpu_shim_still_needed[{name}]",
        cpu_only=True,
    )


PATCHES: tuple[Patch, ...] = (
    _cpu(
        "cpu-current-device",
        ("torch.cuda.current_device",),
        "megatron passes device=torch.cuda.current_device() to tensor factories; a CPU torch raises",
    ),
    _cpu(
        "cpu-rng-tracker",
        (
            "megatron.core.tensor_parallel.random._get_cuda_rng_state",
            "megatron.core.tensor_parallel.random._set_cuda_rng_state",
            "megatron.core.tensor_parallel.random.CudaRNGStatesTracker.add",
            "megatron.core.tensor_parallel.random.CudaRNGStatesTracker.fork",
        ),
        "the model-parallel RNG tracker reads and writes the CUDA generator, absent on a CPU torch",
    ),
    _cpu(
        "cpu-causal-mask",
        (
            "megatron.core.transformer.utils.get_default_causal_mask",
            "megatron.core.fusions.fused_softmax.get_default_causal_mask",
        ),
        'the default causal mask is built with device="cuda"',
    ),
    _cpu(
        "cpu-tensor-cuda",
        ("torch.Tensor.cuda",),
        "LanguageModule moves the tied embedding with weight.data.cuda() before the PP all-reduce",
    ),
    _cpu(
        "cpu-torch-proxy",
        tuple(
            f"{m}.torch"
            for m in (
                "megatron.core.pipeline_parallel.schedules",
                "megatron.core.pipeline_parallel.p2p_communication",
                "megatron.core.distributed.distributed_data_parallel",
                "megatron.core.distributed.param_and_grad_buffer",
                "megatron.core.distributed.finalize_model_grads",
                "megatron.core.optimizer.optimizer",
                "megatron.core.optimizer.distrib_optimizer",
                "megatron.core.optimizer.clip_grads",
                "megatron.core.optimizer.grad_scaler",
                "megatron.core.utils",
            )
        ),
        'schedules, DDP, optimizers and grad norms hard-code device="cuda" and CUDA streams',
    ),
    _cpu(
        "cpu-tensor-type",
        ("torch.Tensor.type",),
        "optimizer and clip_grads accept only params whose type() is 'torch.cuda.FloatTensor'",
    ),
    Patch(
        name="cpu-writer-preload",
        module="dapo_megatron.compat.megatron_checkpoint",
        targets=("megatron.core.dist_checkpointing.strategies.filesystem_async.FileSystemWriterAsync.preload_tensors",),
        outside=OutsideRange.REFUSE,
        why="the checkpoint writer stages tensors with non_blocking=True, then calls torch.cuda.synchronize()",
        needed_test="tests/unit/test_compat_needed.py::test_cpu_shim_still_needed[cpu-writer-preload]",
        cpu_only=True,
    ),
    Patch(
        name="single-rank-writes-deferred",
        module="dapo_megatron.compat.megatron_checkpoint",
        targets=(
            "megatron.core.dist_checkpointing.strategies.common.TorchCommonSaveStrategy.save_common",
            "megatron.core.dist_checkpointing.strategies.common.TorchCommonSaveStrategy.save_sharded_objects",
            "megatron.core.dist_checkpointing.strategies.filesystem_async.FileSystemWriterAsync.finish",
            "megatron.core.dist_checkpointing.serialization.save_config",
        ),
        outside=OutsideRange.WARN,
        why="a write only one rank does (common.pt, .metadata, metadata.json) fails on that rank alone; "
        "the others wait in the next collective until the timeout",
        needed_test="tests/dist/test_compat_dist_needed.py::test_single_rank_write_failure_strands_the_other_rank",
    ),
    Patch(
        name="sync-save-results-in-process",
        module="dapo_megatron.compat.megatron_checkpoint",
        targets=("megatron.core.dist_checkpointing.strategies.filesystem_async._get_write_results_queue",),
        measured=("0.16.1",),
        outside=OutsideRange.WARN,
        why="the checkpoint writer's results queue is a Manager started with spawn, which re-imports the "
        "training script's modules at the first save (8-24 s on 2 CPU cores) and keeps a process per rank",
        needed_test="tests/unit/test_compat_needed.py::test_megatron_writer_spawns_a_manager_for_its_results",
    ),
    Patch(
        name="fully-reshardable-buckets",
        module="dapo_megatron.compat.megatron_optimizer",
        targets=(
            "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer.sharded_param_state_fully_reshardable",
        ),
        versions=("0.16.1", "0.16.2"),
        measured=("0.16.1",),
        outside=OutsideRange.REFUSE,
        why="with several DDP buckets the fully_reshardable save slices unpadded state with padded offsets "
        "and saves parameters with each other's weights and Adam moments",
        needed_test="tests/dist/test_ddp_buckets.py::test_multi_bucket_checkpoint_round_trip_is_exact_only_with_the_fix",
        workaround="use one DDP bucket (actor.ddp.overlap_grad_reduce=false)",
    ),
    Patch(
        name="adam-step-passthrough",
        module="dapo_megatron.compat.megatron_optimizer",
        targets=(
            "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer._set_main_param_and_optimizer_states",
        ),
        outside=OutsideRange.WARN,
        why="loading fully_reshardable state into torch's Adam (no Apex/TE) raises KeyError: 'step'",
        needed_test="tests/dist/test_compat_dist_needed.py::test_fully_reshardable_load_without_passthrough_raises_keyerror",
    ),
    Patch(
        name="vllm-eager-token-ranks",
        module="dapo_megatron.compat.vllm_sampler",
        targets=("vllm.v1.sample.sampler.batched_count_greater_than",),
        package="vllm",
        versions=("0.32.0", "0.33"),
        measured=("0.32.0",),
        outside=OutsideRange.WARN,
        why="the sampler's token-rank count is torch.compile'd, and every process compiles it at its first "
        "generate: on CPU inductor builds a C++ kernel, 7-19 s on 2 cores",
        needed_test="tests/unit/test_compat_needed.py::test_vllm_compiles_the_token_rank_count",
        cpu_only=True,
    ),
    Patch(
        name="ray-local-only",
        module="dapo_megatron.compat.ray_local",
        targets=("ray._private.ray_constants.ENABLE_RAY_CLUSTER",),
        package="ray",
        versions=("2.60.0", "3"),
        measured=("2.60.0",),
        outside=OutsideRange.WARN,
        why="a local Ray given 127.0.0.1 as its node address binds the machine's public address instead",
        needed_test="tests/unit/test_compat_needed.py::test_ray_rewrites_loopback_without_local_only_mode",
    ),
)

_BY_NAME = {p.name: p for p in PATCHES}
_WARNED: set[str] = set()


def patch(name: str) -> Patch:
    """The registry entry ``name`` (KeyError names the known ones)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no compat patch {name!r}; registered: {', '.join(_BY_NAME)}") from None


def installed_version(package: str) -> str:
    """``package.__version__`` of the copy that is imported (not the pip metadata, which can
    describe another copy when PYTHONPATH puts one in front)."""
    return str(importlib.import_module(package).__version__)


def _release(version: str) -> tuple[int, ...]:
    match = re.match(r"\d+(?:\.\d+)*", version)
    if match is None:
        raise ValueError(f"unparseable version {version!r}")
    parts = [int(x) for x in match.group(0).split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def version_in_range(version: str, versions: tuple[str, str]) -> bool:
    """Whether ``low <= version < high`` by release numbers (pre/post/local tags ignored)."""
    low, high = versions
    return _release(low) <= _release(version) < _release(high)


def guard(name: str) -> Patch:
    """Check the installed version before patch ``name`` applies; return its entry.

    Outside the measured range a ``REFUSE`` patch raises :class:`UnverifiedVersionError`
    (patching code it was not measured on could corrupt a run silently); a ``WARN`` patch
    warns once per process with :class:`UnverifiedPatchWarning` and applies (it only changes
    how a failure surfaces, or does nothing once upstream is fixed).
    """
    entry = patch(name)
    version = installed_version(entry.package)
    if version_in_range(version, entry.versions):
        return entry
    low, high = entry.versions
    message = (
        f"{entry.package} {version}: compat patch {entry.name!r} ({entry.why}) was measured on "
        f"{', '.join(entry.measured)} and applies to {low} <= version < {high}. Run {entry.needed_test} "
        f"against this version: if it fails the bug is gone and the patch can be deleted, if it passes "
        f"widen the range in dapo_megatron/compat/__init__.py (docs/COMPAT.md)"
    )
    if entry.outside is OutsideRange.REFUSE:
        raise UnverifiedVersionError(message + (f"; or {entry.workaround}" if entry.workaround else ""))
    if entry.name not in _WARNED:
        _WARNED.add(entry.name)
        warnings.warn(message + "; applying it anyway", UnverifiedPatchWarning, stacklevel=2)
    return entry
