"""One weight sync: actor (Megatron, any TP/PP) -> colocated rollout engine (any rollout TP).

``sync_weights`` walks the actor in HF order (:mod:`.gather`: TP all-gather, from the owning
PP stage only the slice this rank's engine keeps -- ``transport.needed_slices()`` --, mapping
to HF names, cast to the rollout dtype, a tied embedding sent again as ``lm_head.weight``), groups
the stream into buckets of ``rollout.weight_sync.bucket_size_mb`` (:mod:`.buckets`) and
hands each bucket to the engine (:mod:`.transport`), which loads it with vLLM's
layerwise in-place reload and shards it for its own TP rank.  Memory in flight per rank:
one bucket plus one tensor -- never a second copy of the model.

Collective: every rank calls it (every rank is both an actor shard and an engine member).
Failure handling: any exception after the engine started loading marks the engine
unusable (``generate`` refuses, naming the cause) and re-raises; the exception must be
raised on every rank at the same point (true for errors that depend on the data, e.g. a
bad shape), otherwise the surviving ranks block in the next collective until the job's
timeout -- the same contract as any SPMD step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dapo_megatron.distributed import this_rank
from dapo_megatron.rollout.engine import RolloutEngine
from dapo_megatron.weight_sync.buckets import bucket_bytes_from_mb, iter_buckets
from dapo_megatron.weight_sync.gather import StageTraffic, iter_engine_hf_weights
from dapo_megatron.weight_sync.transport import ColocatedTransport, StaleTensorDrill, Transport
from dapo_megatron.weight_sync.verify import WeightMismatchError, compare_checksums

__all__ = ["EngineWeightSync", "SyncStats", "sync_weights", "verify_weights", "WeightSyncError"]


class WeightSyncError(RuntimeError):
    """A weight sync failed part-way; the engine is marked unusable."""


@dataclass
class SyncStats:
    tensors: int
    bytes: int
    buckets: int
    seconds: float
    stage_sent_bytes: int = 0  # sent by this rank to other PP stages
    stage_received_bytes: int = 0  # received by this rank from other PP stages

    @property
    def gbps(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e9


def sync_weights(
    model: torch.nn.Module,
    hf_config,
    transport: Transport,
    *,
    dtype: torch.dtype,
    bucket_size_mb: float,
) -> SyncStats:
    """Push the actor's current weights into the engine (collective over all ranks).

    Args:
        model: this rank's Megatron model shard (possibly DDP/Float16 wrapped).
        hf_config: the HF config of the model (selects the mapping).
        transport: e.g. ``ColocatedTransport(engine)`` (the only way the engine is reached).
        dtype: the rollout dtype (tensors are cast before bucketing).
        bucket_size_mb: bucket cap.

    Verification is a separate call, :func:`verify_weights` (:class:`EngineWeightSync` pairs them).

    Raises:
        WeightSyncError: from any failure while loading (chained to the cause).
    """
    cap = bucket_bytes_from_mb(bucket_size_mb)
    t0 = time.perf_counter()
    n_tensors = n_bytes = n_buckets = 0
    traffic = StageTraffic()
    need = transport.needed_slices()
    transport.begin()
    try:
        stream = iter_engine_hf_weights(model, hf_config, dtype=dtype, need=need, traffic=traffic)
        for bucket in iter_buckets(stream, cap):
            transport.send(bucket)
            n_buckets += 1
            n_tensors += len(bucket)
            n_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
            del bucket
        transport.finish()
    except BaseException as e:
        reason = f"weight sync failed after {n_tensors} tensors / {n_buckets} buckets: {type(e).__name__}: {e}"
        transport.abort(reason)
        raise WeightSyncError(reason) from e
    stats = SyncStats(
        tensors=n_tensors,
        bytes=n_bytes,
        buckets=n_buckets,
        seconds=time.perf_counter() - t0,
        stage_sent_bytes=traffic.sent_bytes,
        stage_received_bytes=traffic.received_bytes,
    )
    return stats


def verify_weights(model: torch.nn.Module, hf_config, engine: RolloutEngine, *, dtype: torch.dtype) -> int:
    """Compare every engine tensor shard with the actor's (collective); returns tensors checked on this rank.

    A mismatch found on any rank is raised on every rank (naming the ranks and tensors) and
    marks every rank's engine unusable: the ranks of one engine replica generate together, so
    one rank refusing while the others start would leave them waiting for it.
    """
    shards = engine.engine_checksums()
    rank = this_rank()
    desc = f"rank {rank} (rollout replica {engine.layout.replica}, engine TP rank {engine.layout.rank_in_replica})"
    error: str | None = None
    checked = 0
    try:
        # the slices the sync sends: the checksums compare exactly those (the rest is NaN here)
        actor = iter_engine_hf_weights(model, hf_config, dtype=dtype, need=engine.weight_slices())
        checked = compare_checksums(shards, actor, rank_desc=desc)
    except WeightMismatchError as e:
        error = str(e)
    except BaseException as e:
        engine.mark_broken(f"verification failed: {type(e).__name__}: {e}")
        raise
    errors = [error]
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    failed = [e for e in errors if e is not None]
    if failed:
        message = "\n".join(failed)
        engine.mark_broken(f"verification failed: {message}")
        raise WeightMismatchError(message)
    return checked


class EngineWeightSync:
    """One actor's weights into one colocated engine: :meth:`sync` and :meth:`verify`, the
    :class:`~dapo_megatron.parts.WeightSync` the trainer (and the SFT warm-up) call.

    The engine is named once: the transport is built from it (``stale_tensors``: the
    :class:`~.transport.StaleTensorDrill` fault drill wraps it), and verification reads it back.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        hf_config,
        engine: RolloutEngine,
        *,
        dtype: torch.dtype,
        bucket_size_mb: float,
        stale_tensors=(),
    ) -> None:
        self.model, self.hf_config, self.engine = model, hf_config, engine
        self.dtype, self.bucket_size_mb = dtype, bucket_size_mb
        transport: Transport = ColocatedTransport(engine)
        if stale_tensors:
            transport = StaleTensorDrill(transport, stale_tensors)
        self.transport = transport

    def sync(self) -> SyncStats:
        return sync_weights(
            self.model, self.hf_config, self.transport, dtype=self.dtype, bucket_size_mb=self.bucket_size_mb
        )

    def verify(self) -> int:
        return verify_weights(self.model, self.hf_config, self.engine, dtype=self.dtype)
