"""The actor's learning-rate schedule: warm-up, constant, cosine to min_lr."""

from __future__ import annotations

import math

import pytest

from dapo_megatron.actor.optimizer import lr_at_step
from dapo_megatron.config import OptimConfig


def test_warmup_then_constant():
    o = OptimConfig(lr=1e-3, lr_warmup_steps=4, lr_decay_style="constant")
    lrs = [lr_at_step(s, o) for s in range(7)]
    assert lrs[:4] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4])
    assert lrs[4:] == [1e-3] * 3
    assert lrs[0] > 0  # the first step is never wasted at lr 0


def test_cosine_reaches_min_lr_and_stays():
    o = OptimConfig(lr=1.0, min_lr=0.1, lr_warmup_steps=2, lr_decay_style="cosine", lr_decay_steps=10)
    assert lr_at_step(2, o) == pytest.approx(1.0)
    assert lr_at_step(7, o) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at_step(12, o) == pytest.approx(0.1)
    assert lr_at_step(100, o) == pytest.approx(0.1)
    lrs = [lr_at_step(s, o) for s in range(2, 13)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_cosine_defaults_to_total_steps_and_errors_name_the_key():
    o = OptimConfig(lr=1.0, min_lr=0.0, lr_warmup_steps=0, lr_decay_style="cosine")
    assert lr_at_step(5, o, total_steps=10) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="lr_decay_steps"):
        lr_at_step(5, o)
    with pytest.raises(ValueError, match="lr_decay_style"):
        lr_at_step(5, OptimConfig(lr_warmup_steps=0, lr_decay_style="linear"))
    with pytest.raises(ValueError, match="step"):
        lr_at_step(-1, o)
