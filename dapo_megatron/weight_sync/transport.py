"""Transports: how a bucket of HF-named tensors reaches the engine.  One class per transport.

Only the colocated in-process transport exists: the engine lives in the same process
as the actor shard, so a bucket is handed over as a Python list of tensors (no copy,
no serialisation).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping

import torch

from dapo_megatron.rollout.engine import RolloutEngine
from dapo_megatron.weight_sync.slices import TensorSlice

__all__ = ["Transport", "ColocatedTransport", "StaleTensorDrill"]


class Transport(abc.ABC):
    """begin -> send(bucket)* -> finish; abort on any failure in between."""

    def needed_slices(self) -> Mapping[str, TensorSlice] | None:
        """Which slice of each HF tensor the receiver behind this rank keeps (``None``: all of every tensor).

        With the actor split into pipeline stages only these slices cross stages to this rank.
        """
        return None

    @abc.abstractmethod
    def begin(self) -> None: ...

    @abc.abstractmethod
    def send(self, bucket: list[tuple[str, torch.Tensor]]) -> None: ...

    @abc.abstractmethod
    def finish(self) -> None: ...

    @abc.abstractmethod
    def abort(self, reason: str) -> None:
        """Leave the receiver marked unusable (its weights are half-updated)."""


class ColocatedTransport(Transport):
    """Hands buckets to a :class:`~dapo_megatron.rollout.engine.RolloutEngine` in this process
    (:class:`~dapo_megatron.rollout.vllm_engine.VllmEngine`) through its weight-update lifecycle."""

    def __init__(self, engine: RolloutEngine):
        self.engine = engine

    def needed_slices(self) -> Mapping[str, TensorSlice] | None:
        return self.engine.weight_slices()

    def begin(self) -> None:
        self.engine.begin_weight_update()

    def send(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        self.engine.load_weight_bucket(bucket)

    def finish(self) -> None:
        self.engine.finish_weight_update()

    def abort(self, reason: str) -> None:
        self.engine.mark_broken(reason)


class StaleTensorDrill(Transport):
    """Fault drill (``rollout.weight_sync.inject_stale_tensors``): the named tensors keep the value of
    the first sync in the engine, as a layer that silently misses updates would (a tied LM head did).

    Exists to show that verification and the mismatch guard stop such a run; the rest of the
    stream passes through unchanged.
    """

    def __init__(self, inner: Transport, names):
        self.inner = inner
        self.names = frozenset(names)
        self._first: dict[str, torch.Tensor] = {}

    def needed_slices(self) -> Mapping[str, TensorSlice] | None:
        return self.inner.needed_slices()

    def begin(self) -> None:
        self.inner.begin()

    def send(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        out = []
        for name, t in bucket:
            if name in self.names:
                t = self._first.setdefault(name, t.detach().clone())
            out.append((name, t))
        self.inner.send(out)

    def finish(self) -> None:
        self.inner.finish()

    def abort(self, reason: str) -> None:
        self.inner.abort(reason)
