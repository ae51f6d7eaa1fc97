"""The collective device policy (dapo_megatron/distributed.py) and the backend init_parallel uses.

The multi-rank behaviour of the helpers is in tests/dist/test_collectives.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dapo_megatron import distributed
from dapo_megatron.actor import parallel


def test_default_backend_is_mixed_on_cuda_and_gloo_on_cpu():
    assert distributed.default_backend(cuda_available=True) == "cpu:gloo,cuda:nccl"
    assert distributed.default_backend(cuda_available=False) == "gloo"


@pytest.mark.parametrize(
    ("config", "cpu"),
    [
        ("cpu:gloo,cuda:nccl", True),
        ("cpu:gloo,cuda:gloo", True),  # what dist.get_backend_config reports for plain gloo
        ("gloo", True),
        ("cuda:nccl", False),
        ("nccl", False),
        ("CUDA:NCCL, CPU:GLOO", True),
    ],
)
def test_supports_cpu_tensors(config, cpu):
    assert distributed.supports_cpu_tensors(config) is cpu


def test_init_process_group_asks_for_the_mixed_backend_when_cuda_is_present(monkeypatch):
    """A CUDA run's default group must reduce CPU tensors (stop flags, metric sums) too."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(("init", kw["backend"])))
    monkeypatch.setattr(parallel, "_WE_CREATED_PROCESS_GROUP", False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "3")
    parallel._init_process_group(timeout_minutes=1)
    assert calls == [("set_device", 3), ("init", "cpu:gloo,cuda:nccl")]


def test_init_process_group_uses_gloo_without_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(kw["backend"]))
    monkeypatch.setattr(parallel, "_WE_CREATED_PROCESS_GROUP", False)
    monkeypatch.delenv("RANK", raising=False)
    parallel._init_process_group(timeout_minutes=1)
    assert calls == ["gloo"]


def test_scalar_device_follows_the_group_backend(monkeypatch):
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: "cpu:gloo,cuda:nccl")
    assert distributed.scalar_device() == torch.device("cpu")
    # a group created by someone else with NCCL alone: the helpers move to the current GPU
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: "cuda:nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)
    assert distributed.scalar_device() == torch.device("cuda", 5)


def test_helpers_without_a_process_group_return_the_local_values(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    assert distributed.all_sum([1, 2.5]) == [1.0, 2.5]
    assert distributed.all_max([-1, 3]) == [-1.0, 3.0]
    assert distributed.any_true(True) is True
    assert distributed.any_true(False) is False
