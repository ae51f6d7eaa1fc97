"""Metrics under verl's names follow verl's definitions (whole batch, token-weighted, per GPU)."""

from __future__ import annotations

import pytest
import torch

from dapo_megatron.observability.verl_metrics import advantage_metrics, progress_metrics, throughput_metrics


def test_advantages_are_token_weighted_over_the_whole_batch():
    # two responses of 1 and 3 tokens: verl's masked mean is (1*1 + 3*(-1)) / 4, not (1 - 1) / 2
    out = advantage_metrics(torch.tensor([1.0, -1.0, 5.0]), [1, 3, 0])
    assert out == {"critic/advantages/mean": -0.5, "critic/advantages/max": 1.0, "critic/advantages/min": -1.0}
    with pytest.raises(ValueError, match="3 advantages for 2 responses"):
        advantage_metrics(torch.zeros(3), [1, 2])


def test_throughput_is_trained_prompt_and_response_tokens_per_second_per_gpu():
    out = throughput_metrics([10, 10], [5, 15], step_seconds=2.0, num_gpus=4, generated_tokens=20.0, dp_size=2)
    assert out == {"perf/total_num_tokens": 40.0, "perf/throughput": 5.0, "perf/generation_throughput": 5.0}


def test_progress():
    assert progress_metrics(3, 1) == {"training/global_step": 3.0, "training/epoch": 1.0}


def test_validation_names_are_pinned_and_emitted():
    """The validation names a verl dashboard reads, for one source sampled 4 times, are those
    the validation functions emit (definitions: tests/unit/test_verl_val_metrics.py)."""
    from dapo_megatron.reward.val_metrics import avg_at_k, verl_val_metrics
    from tests.verl_names import val_names

    assert val_names("aime", 4) == [
        "val-core/aime/acc/mean@4",
        "val-core/aime/acc/best@4/mean",
        "val-core/aime/acc/best@4/std",
        "val-core/aime/acc/maj@4/mean",
        "val-core/aime/acc/maj@4/std",
        "val-aux/aime/acc/std@4",
        "val-aux/aime/score/mean@4",
        "val-aux/aime/reward/mean@4",
        "val-aux/aime/score/best@4/mean",
        "val-aux/aime/reward/maj@4/mean",
        "val-aux/aime/acc/best@2/mean",
        "val-aux/aime/acc/best@2/std",
        "val-aux/aime/acc/worst@2/mean",
        "val-aux/aime/acc/worst@2/std",
        "val-aux/aime/acc/maj@2/mean",
        "val-aux/aime/acc/maj@2/std",
        "val-aux/aime/acc/worst@4/mean",
        "val-aux/aime/acc/worst@4/std",
        "val-aux/aime/pass@4",
        "val-aux/aime/acc/sem@4",
        "val-aux/aime/acc/problem_std@4",
    ]
    acc = [1, 0, 0, 1, 0, 0, 0, 0]
    gids, sources = ["a"] * 4 + ["b"] * 4, ["aime"] * 8
    values = {"acc": acc, "score": [2 * a - 1 for a in acc], "reward": [2 * a - 1.5 for a in acc]}
    emitted = {**verl_val_metrics(values, gids, sources, list("12213343")), **avg_at_k(acc, gids, sources)}
    assert [name for name in val_names("aime", 4) if name not in emitted] == []
