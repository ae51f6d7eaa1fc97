"""CPU-only monkeypatches that let megatron-core run on a CPU-only torch with gloo.

Why they exist: megatron-core assumes a CUDA device in code paths the CPU test machine
exercises (model construction, RNG streams, attention masks, the pipeline schedule, DDP,
the optimizers); each shim below was measured to be needed there (megatron-core 0.16.1 and
0.19.2, torch 2.13 CPU) and has a test that runs the unpatched code and shows the failure
(tests/unit/test_compat_needed.py; docs/COMPAT.md has the root causes).

Quarantined: importing this module patches nothing (tests/unit/test_compat.py checks it); only
:func:`apply_cpu_shims` does, called from the no-CUDA branch of
:func:`dapo_megatron.actor.parallel.init_parallel`, and it refuses to run when CUDA is available,
so a GPU job can never be silently altered by it.  It also refuses a megatron-core outside the
measured range (:func:`dapo_megatron.compat.guard`): the torch proxy and the replaced RNG tracker
methods rely on megatron's module layout and private names, and a CPU run is a test run, where a
loud refusal costs less than a silently wrong result.

Shims applied (idempotently) by :func:`apply_cpu_shims`:

``torch.cuda.current_device`` -> ``"cpu"``
    Megatron passes ``device=torch.cuda.current_device()`` to tensor factories
    in ~100 places (RotaryEmbedding's ``inv_freq``, TP all-gather buffers in
    ``tensor_parallel.mappings``, ``MegatronModule`` helpers, ...).  On a CPU
    torch the original raises "Torch not compiled with CUDA enabled";
    returning the string ``"cpu"`` makes every such factory allocate on CPU.

RNG tracker (``megatron.core.tensor_parallel.random``)
    ``model_parallel_cuda_manual_seed`` and ``CudaRNGStatesTracker.add/fork``
    read and write the CUDA generator (``torch.cuda.get_rng_state``), which
    does not exist on a CPU build.  We route ``_get_cuda_rng_state`` /
    ``_set_cuda_rng_state`` to the CPU default generator and replace
    ``CudaRNGStatesTracker.add`` (seeds a private ``torch.Generator`` and keeps
    its state) and ``CudaRNGStatesTracker.fork`` (swaps the CPU default
    generator's state in and out).  The original ``fork`` also warns whenever
    the CPU state changes inside the fork, which on CPU is every random draw,
    so it is replaced rather than reused.  Semantics are preserved: inside
    ``fork(name)`` random ops draw from the per-TP-rank stream ``name`` and the
    default stream is restored afterwards.

``get_default_causal_mask`` (``megatron.core.transformer.utils`` and its
imported alias in ``megatron.core.fusions.fused_softmax``)
    Builds the causal mask with ``device="cuda"`` when attention is called with
    ``attention_mask=None``; the replacement builds it on CPU.

``torch.Tensor.cuda`` -> returns ``self``
    ``LanguageModule.setup_embeddings_and_output_layer`` moves the tied
    embedding/output weight with ``weight.data.cuda()`` before the all-reduce
    that syncs the first and last PP stage (tied embeddings with PP > 1).  On a
    CPU build ``.cuda()`` raises; making it the identity keeps such tensors on
    CPU.  (Only ever applied when CUDA is unavailable, where the original can
    only raise.)

``torch`` module global of the training-loop modules -> :class:`_CpuTorchProxy`
    The pipeline schedules (``total_num_tokens = torch.zeros(..., device="cuda")``),
    the optimizers (``found_inf``/``_scale_one`` on ``device='cuda'``), ``clip_grads``
    (grad-norm accumulators), ``megatron.core.utils`` (the fallback
    ``local_multi_tensor_l2_norm`` used for the grad norm without apex) and DDP's buffers (``torch.cuda.Stream``,
    ``torch.cuda.default_stream()``, ``torch.cuda.synchronize``) hard-code CUDA.
    Instead of patching ``torch`` itself, the ``torch`` name inside exactly those
    modules (:data:`_TORCH_PROXY_MODULES`) is rebound to a proxy that forwards every
    attribute to the real torch, except that tensor factories map a CUDA ``device``
    argument to CPU and ``proxy.cuda`` offers no-op streams/synchronisation.  A global
    ``TorchFunctionMode`` would do the same but cost 15-20 ms per micro-batch (measured on the
    2-core CPU test machine, batch 8 x 128 tokens, where a tiny model's forward and backward
    take ~26 ms).

``torch.Tensor.type()`` (no arguments) reports ``torch.cuda.*Tensor`` for CPU tensors
    ``MixedPrecisionOptimizer`` / ``DistributedOptimizer`` / ``clip_grads`` sort
    parameters by ``param.type() == 'torch.cuda.FloatTensor'`` and raise on anything
    else.  Only the zero-argument form is changed; ``t.type(dtype)`` conversions are
    untouched.  This one is process-wide (like ``Tensor.cuda``): after the shims, code
    comparing ``t.type()`` with ``"torch.FloatTensor"`` would see the CUDA name.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
import types

import torch
from megatron.core.fusions import fused_softmax
from megatron.core.tensor_parallel import random as mpu_random
from megatron.core.transformer import utils as transformer_utils

from dapo_megatron.compat import guard, patch

__all__ = ["CPU_SHIMS", "apply_cpu_shims", "cpu_shims_applied"]

# the registry entries (dapo_megatron.compat.PATCHES) this module applies
CPU_SHIMS = (
    "cpu-current-device",
    "cpu-rng-tracker",
    "cpu-causal-mask",
    "cpu-tensor-cuda",
    "cpu-torch-proxy",
    "cpu-tensor-type",
)

_LOCK = threading.Lock()
_APPLIED = False


def cpu_shims_applied() -> bool:
    """Whether :func:`apply_cpu_shims` has run in this process."""
    return _APPLIED


def _cpu_current_device() -> str:
    return "cpu"


def _patch_current_device() -> None:
    torch.cuda.current_device = _cpu_current_device  # type: ignore[assignment]


def _patch_rng() -> None:
    def _get_cpu_rng_state(device=None, clone: bool = False, graph_safe: bool = False):
        del device, clone, graph_safe
        return torch.get_rng_state()

    def _set_cpu_rng_state(new_state, device=None, graph_safe: bool = False):
        del device, graph_safe
        torch.set_rng_state(new_state)

    def add(self, name, seed):
        """Track a new named RNG stream seeded with ``seed`` (CPU generator)."""
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed)
        self.states_[name] = gen.get_state()

    @contextlib.contextmanager
    def fork(self, name=mpu_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        """Run the body with the CPU default generator set to stream ``name``."""
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig_state = torch.get_rng_state()
        orig_name = self._current_state_name
        if orig_name != "default-rng":
            self.states_[orig_name] = orig_state
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            if self._current_state_name != name:
                raise Exception(
                    f"current rng state name {self._current_state_name} is not the desired state name {name}"
                )
            self.states_[name] = torch.get_rng_state()
            if orig_name != "default-rng":
                orig_state = self.states_[orig_name]
            torch.set_rng_state(orig_state)
            self._current_state_name = orig_name

    mpu_random._get_cuda_rng_state = _get_cpu_rng_state
    mpu_random._set_cuda_rng_state = _set_cpu_rng_state
    mpu_random.CudaRNGStatesTracker.add = add
    mpu_random.CudaRNGStatesTracker.fork = fork


def _tensor_cuda_identity(self, *args, **kwargs):
    return self


def _patch_tensor_cuda() -> None:
    torch.Tensor.cuda = _tensor_cuda_identity  # type: ignore[method-assign]


def _patch_causal_mask() -> None:
    def get_default_causal_mask(sq: int) -> torch.Tensor:
        """Causal upper-triangular mask (True = masked out), on CPU."""
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    transformer_utils.get_default_causal_mask = get_default_causal_mask
    fused_softmax.get_default_causal_mask = get_default_causal_mask


# Modules whose global ``torch`` is swapped for the CPU proxy (see the module docstring); the
# registry entry names them, so the list lives once.
_TORCH_PROXY_MODULES: tuple[str, ...] = tuple(t.removesuffix(".torch") for t in patch("cpu-torch-proxy").targets)

_FACTORIES = frozenset(
    {
        "zeros",
        "ones",
        "empty",
        "full",
        "tensor",
        "arange",
        "rand",
        "randn",
        "randint",
        "zeros_like",
        "ones_like",
        "empty_like",
        "full_like",
        "as_tensor",
        "linspace",
        "eye",
    }
)


def _cpu_device(device):
    """Map any CUDA device spec (``"cuda"``, ``"cuda:0"``, int, torch.device) to ``"cpu"``."""
    if device is None:
        return None
    if isinstance(device, int):
        return "cpu"
    if isinstance(device, torch.device):
        return "cpu" if device.type == "cuda" else device
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    return device


class _NullStream:
    """Stand-in for ``torch.cuda.Stream``: CPU work is synchronous, so waits are no-ops."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event=None):
        return event


class _CpuCudaNamespace(types.SimpleNamespace):
    """``torch.cuda`` as seen by the proxied modules: streams and syncs are no-ops."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


def _make_cuda_namespace() -> _CpuCudaNamespace:
    null = _NullStream()
    return _CpuCudaNamespace(
        Stream=_NullStream,
        current_stream=lambda *a, **k: null,
        default_stream=lambda *a, **k: null,
        stream=lambda *a, **k: contextlib.nullcontext(),
        synchronize=lambda *a, **k: None,
        empty_cache=lambda: None,
        current_device=_cpu_current_device,
        is_available=lambda: False,
    )


class _CpuTorchProxy(types.ModuleType):
    """The real ``torch`` module, except CUDA ``device=`` factory arguments become CPU."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.__dict__["cuda"] = _make_cuda_namespace()
        for name in _FACTORIES:
            self.__dict__[name] = self._wrap_factory(getattr(torch, name))

    @staticmethod
    def _wrap_factory(fn):
        def factory(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _cpu_device(kwargs["device"])
            return fn(*args, **kwargs)

        factory.__name__ = fn.__name__
        factory.__doc__ = fn.__doc__
        return factory

    def __getattr__(self, name):
        return getattr(torch, name)


def _patch_module_torch_globals() -> None:
    proxy = _CpuTorchProxy()
    for mod_name in _TORCH_PROXY_MODULES:
        mod = importlib.import_module(mod_name)
        if getattr(mod, "torch", None) is not torch:
            raise RuntimeError(f"{mod_name} has no global 'torch' to proxy (megatron-core layout changed?)")
        mod.torch = proxy


_ORIGINAL_TENSOR_TYPE = torch.Tensor.type


def _tensor_type_cuda_names(self, dtype=None, non_blocking: bool = False, **kwargs):
    if dtype is None and not kwargs:
        name = _ORIGINAL_TENSOR_TYPE(self)
        if self.device.type == "cpu" and name.startswith("torch.") and not name.startswith("torch.cuda."):
            return "torch.cuda." + name[len("torch.") :]
        return name
    return _ORIGINAL_TENSOR_TYPE(self, dtype, non_blocking, **kwargs)


def _patch_tensor_type() -> None:
    torch.Tensor.type = _tensor_type_cuda_names  # type: ignore[method-assign]


def apply_cpu_shims() -> None:
    """Apply every CPU shim once (idempotent, thread-safe).

    Raises:
        RuntimeError: if CUDA is available -- the shims would corrupt a GPU run.
        UnverifiedVersionError: megatron-core is outside the range the shims were measured on.
    """
    global _APPLIED
    if torch.cuda.is_available():
        raise RuntimeError(
            "apply_cpu_shims() called on a machine with CUDA available; the CPU shims "
            "must never be applied to a GPU run"
        )
    with _LOCK:
        if _APPLIED:
            return
        for name in CPU_SHIMS:
            guard(name)
        _patch_current_device()
        _patch_rng()
        _patch_causal_mask()
        _patch_tensor_cuda()
        _patch_tensor_type()
        _patch_module_torch_globals()
        _APPLIED = True
