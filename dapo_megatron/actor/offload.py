"""Moving the actor's training state off the device while the engine generates, and back.

Why the storage and not the tensor: Megatron's DDP keeps parameters and gradients in a few
contiguous buffers, and views of them are held everywhere (``param.data``, ``param.main_grad``,
bucket views, the distributed optimizer's fp32 shards of fp32 parameters).  Replacing a tensor
would leave every other holder pointing at the old memory.  Resizing its *storage* to zero
bytes frees the memory while every view stays the same Python object; resizing it back and
copying the saved bytes in restores all of them in place, bit for bit.

What each kind keeps:

* ``params``: the model's parameter storages (the DDP param buffer with the distributed
  optimizer), copied to host memory (pinned with CUDA) and back.
* ``grads``: the DDP gradient buffers.  Not copied: every mini-batch starts by zeroing them,
  so they come back zeroed (as Megatron's own ``offload_grad_buffers`` does).
* ``optimizer``: the optimizer's fp32 main parameters that are not views of the model's
  parameters, and its per-parameter state (Adam's moments), copied and restored.

Touching an offloaded view is undefined (on CPU it reads freed memory), so the actor refuses
every computation while any kind its caller needs is away (:meth:`ActorOffloader.require`).
The same code runs on CPU, where the "host" copy is another CPU tensor: the test of bit-exact
training with offload exercises the real swap.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from dapo_megatron.config import OFFLOAD_KINDS

__all__ = [
    "OFFLOAD_KINDS",
    "ActorOffloader",
    "OffloadStats",
    "ActorStateOffloadedError",
    "empty_device_cache",
    "torch_optimizers",
]


class ActorStateOffloadedError(RuntimeError):
    """A computation needed actor state that is offloaded (a lifecycle ordering bug)."""


@dataclass
class _Stash:
    storage: torch.UntypedStorage
    nbytes: int
    host: torch.Tensor | None  # None: the contents are not kept (gradients come back zeroed)


@dataclass
class OffloadStats:
    """What one offload or onload moved: bytes and seconds per kind."""

    bytes: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


def _raw(storage: torch.UntypedStorage) -> torch.Tensor:
    """A flat byte tensor over the whole storage (the unit that is copied and freed)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def _unique(tensors, taken: set[int]) -> list[torch.UntypedStorage]:
    out = []
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        s = t.untyped_storage()
        key = s.data_ptr()
        if s.nbytes() == 0 or key in taken:
            continue
        taken.add(key)
        out.append(s)
    return out


def torch_optimizers(optimizer) -> list:
    """The torch optimizers under megatron's (chained, distributed, fp32 or mixed) wrappers."""
    chained = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [opt.optimizer for opt in chained if getattr(opt, "optimizer", None) is not None]


def empty_device_cache() -> None:
    """Hand the caching allocator's free blocks back to the driver, so the engine can take them."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


class ActorOffloader:
    """Offloads and onloads the actor's params, grads and optimizer state by kind."""

    def __init__(self, ddp_model, optimizer) -> None:
        self.model = ddp_model
        self.optimizer = optimizer
        self._stashed: dict[str, list[_Stash]] = {}
        # Host buffers are kept between offloads: pinned allocations cost about as much as the
        # copy itself, and every step offloads the same storages again (Megatron's DDP buffers
        # keep their pinned copies the same way).
        self._host: dict[str, list[torch.Tensor]] = {}

    # ------------------------------------------------------------- what is where
    def _storages(self) -> dict[str, list[torch.UntypedStorage]]:
        """The storages of each kind, each storage in one kind only (params first)."""
        taken: set[int] = set()
        params = _unique(self.model.parameters(), taken)
        buffers = list(getattr(self.model, "buffers", [])) + list(getattr(self.model, "expert_parallel_buffers", []))
        grads = _unique([b.grad_data for b in buffers], taken)
        opt_tensors: list[torch.Tensor] = []
        for torch_opt in torch_optimizers(self.optimizer):
            for group in torch_opt.param_groups:
                opt_tensors.extend(group["params"])
            for state in torch_opt.state.values():
                opt_tensors.extend(v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
        optimizer = _unique(opt_tensors, taken)
        return {"params": params, "grads": grads, "optimizer": optimizer}

    def resident_bytes(self) -> dict[str, int]:
        """Device bytes each kind holds now (0 for an offloaded kind)."""
        return {k: sum(s.nbytes() for s in v) for k, v in self._storages().items()}

    def require(self, kinds: tuple[str, ...], what: str) -> None:
        away = [k for k in kinds if k in self._stashed]
        if away:
            raise ActorStateOffloadedError(
                f"cannot {what}: the actor's {', '.join(away)} are offloaded (the trainer must onload them first)"
            )

    # -------------------------------------------------------------- offload/onload
    def offload(self, kinds: tuple[str, ...]) -> OffloadStats:
        """Copy ``kinds`` to host memory (grads: dropped) and free their device storage."""
        _check_kinds(kinds)
        stats = OffloadStats()
        storages = self._storages()
        pin = torch.cuda.is_available()
        moved: dict[str, list[_Stash]] = {}
        for kind in kinds:
            if kind in self._stashed:
                continue
            t0 = time.perf_counter()
            stashes = []
            hosts = self._host.get(kind, [])
            if [h.numel() for h in hosts] != [s.nbytes() for s in storages[kind]]:
                hosts = []  # first offload of this kind (or its storages changed): allocate
            for i, s in enumerate(storages[kind]):
                host = None
                if kind != "grads":
                    host = hosts[i] if hosts else torch.empty(s.nbytes(), dtype=torch.uint8, pin_memory=pin)
                    host.copy_(_raw(s), non_blocking=pin)
                stashes.append(_Stash(s, s.nbytes(), host))
            if kind != "grads":
                self._host[kind] = [st.host for st in stashes]
            moved[kind] = stashes
            stats.seconds[kind] = time.perf_counter() - t0
            stats.bytes[kind] = sum(st.nbytes for st in stashes)
        if pin:
            torch.cuda.synchronize()  # the copies read the storage that is freed next
        for kind, stashes in moved.items():
            t0 = time.perf_counter()
            for st in stashes:
                st.storage.resize_(0)
            stats.seconds[kind] += time.perf_counter() - t0
            self._stashed[kind] = stashes
        return stats

    def onload(self, kinds: tuple[str, ...]) -> OffloadStats:
        """Reallocate ``kinds`` on the device and copy their bytes back (grads: zeroed)."""
        _check_kinds(kinds)
        stats = OffloadStats()
        for kind in kinds:
            stashes = self._stashed.pop(kind, None)
            if stashes is None:
                continue
            t0 = time.perf_counter()
            for st in stashes:
                st.storage.resize_(st.nbytes)
                raw = _raw(st.storage)
                if st.host is None:
                    raw.zero_()
                else:
                    raw.copy_(st.host, non_blocking=True)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            stats.seconds[kind] = time.perf_counter() - t0
            stats.bytes[kind] = sum(st.nbytes for st in stashes)
        return stats


def _check_kinds(kinds: tuple[str, ...]) -> None:
    bad = [k for k in kinds if k not in OFFLOAD_KINDS]
    if bad:
        raise ValueError(f"unknown offload kinds {bad}; expected some of {OFFLOAD_KINDS}")
