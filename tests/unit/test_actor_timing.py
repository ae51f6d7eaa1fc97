"""MegatronActor.update's clock and memory peaks as a CUDA run sees them (the CUDA calls recorded).

The update's own work is replaced by recorders: what is pinned is where the device is synchronised
(around the clock, so the optimizer's queued kernels are inside the measured time that the
trainer's MFU also uses) and that the memory peaks are read under verl's names and then reset.
"""

from __future__ import annotations

import itertools
import time
from types import SimpleNamespace

import pytest
import torch

from dapo_megatron.actor.actor import MegatronActor, memory_metrics
from dapo_megatron.config import ActorConfig


@pytest.fixture
def cuda_recorder(monkeypatch):
    events: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: events.append("sync"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: events.append("peak") or 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *a: 5 * 2**30)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: events.append("reset"))
    return events


def _fake_actor(events: list[str]):
    stats = {"pg_loss": 0.5, "entropy": 1.0, "pg_clipfrac": 0.0, "pg_clipfrac_lower": 0.0, "ppo_kl": 0.0}
    return SimpleNamespace(
        cfg=ActorConfig(),
        update_count=0,
        total_training_steps=10,
        optimizer=SimpleNamespace(param_groups=[{}]),
        dp_size=1,
        zero_grad=lambda: None,
        require_resident=lambda kinds, what: None,
        _mini_batch_slices=lambda batch: [torch.arange(0, 2), torch.arange(2, 4)],
        forward_backward=lambda batch, inject_nan: events.append("fwd_bwd") or {**stats, "num_micro_batches": 1.0},
        _optimizer_step=lambda loss: events.append("step") or (True, 1.0),
    )


def test_update_times_the_finished_optimizer_step(cuda_recorder, monkeypatch):
    events = cuda_recorder
    ticks = itertools.count()
    monkeypatch.setattr(time, "perf_counter", lambda: events.append("clock") or float(next(ticks)))
    batch = SimpleNamespace(
        select=lambda idx: None, seq_lengths=torch.tensor([3, 4, 5, 6]), old_log_probs=torch.zeros(4, 1)
    )
    metrics = MegatronActor.update(_fake_actor(events), batch)
    assert events == ["sync", "clock", "fwd_bwd", "step", "fwd_bwd", "step", "sync", "clock", "peak", "reset"]
    assert metrics["perf/max_memory_allocated_gb"] == 3.0
    assert metrics["perf/max_memory_reserved_gb"] == 5.0


def test_memory_peaks_are_reset_per_call(cuda_recorder):
    assert memory_metrics() == {"perf/max_memory_allocated_gb": 3.0, "perf/max_memory_reserved_gb": 5.0}
    assert cuda_recorder == ["peak", "reset"]


def test_cpu_reports_the_process_peak(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = memory_metrics()
    assert list(out) == ["perf/max_rss_gb"] and out["perf/max_rss_gb"] > 0
