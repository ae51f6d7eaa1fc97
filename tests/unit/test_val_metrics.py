"""avg@k validation metrics."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dapo_megatron.reward.val_metrics import avg_at_k


def test_hand_computed_example() -> None:
    # Problem a: 2/4 correct, b: 0/4, c: 4/4 -> means 0.5, 0, 1.
    acc = [1, 0, 1, 0] + [0, 0, 0, 0] + [1, 1, 1, 1]
    gids = ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    out = avg_at_k(acc, gids, ["aime"] * 12)
    assert out == pytest.approx(
        {
            "val-core/aime/acc/mean@4": 0.5,
            "val-aux/aime/acc/problem_std@4": float(np.std([0.5, 0.0, 1.0])),
            "val-aux/aime/pass@4": 2 / 3,
            "val-aux/aime/acc/sem@4": float(np.sqrt(0.5 * 0.5 / 3)) / 3,
        }
    )


def test_sources_are_separate_and_may_have_different_k() -> None:
    acc = [True, False, True, True] + [False, True, False]
    gids = [1, 1, 2, 2] + [10, 11, 12]
    sources = ["aime"] * 4 + ["math"] * 3
    out = avg_at_k(acc, gids, sources)
    assert out["val-core/aime/acc/mean@2"] == pytest.approx(0.75)
    assert out["val-core/math/acc/mean@1"] == pytest.approx(1 / 3)
    assert out["val-aux/math/pass@1"] == pytest.approx(1 / 3)
    assert len(out) == 7  # no sem@1: one sample per problem cannot estimate its own spread
    assert "val-aux/math/acc/sem@1" not in out


def test_sample_order_does_not_matter() -> None:
    rng = random.Random(0)
    rows = [(rng.random() < 0.3, f"p{p}", "aime") for p in range(30) for _ in range(32)]
    ordered = avg_at_k(*zip(*rows, strict=True))
    rng.shuffle(rows)
    assert avg_at_k(*zip(*rows, strict=True)) == pytest.approx(ordered)
    assert set(ordered) == {
        "val-core/aime/acc/mean@32",
        "val-aux/aime/acc/problem_std@32",
        "val-aux/aime/pass@32",
        "val-aux/aime/acc/sem@32",
    }


def test_sem_matches_the_spread_over_validation_seeds() -> None:
    # Fixed problems with their own success rates; only the sampling dice change between
    # evaluations, as with rollout.val.seed. sem@k from one evaluation predicts the spread.
    rng = np.random.default_rng(0)
    p = rng.choice([0.0, 0.05, 0.2, 0.5, 0.8, 1.0], size=200)
    k, gids = 8, [i for i in range(200) for _ in range(8)]
    means, sems = [], []
    for _ in range(400):
        acc = (rng.random((200, k)) < p[:, None]).astype(int).ravel().tolist()
        out = avg_at_k(acc, gids, ["s"] * len(gids))
        means.append(out["val-core/s/acc/mean@8"])
        sems.append(out["val-aux/s/acc/sem@8"])
    assert np.mean(sems) == pytest.approx(np.std(means), rel=0.1)


def test_uneven_group_names_the_problem() -> None:
    with pytest.raises(ValueError, match="problem 'b'.*has 1 samples"):
        avg_at_k([1, 1, 0], ["a", "a", "b"], ["s"] * 3)


def test_problem_in_two_sources_is_an_error() -> None:
    with pytest.raises(ValueError, match="problem 'a' has samples from data sources"):
        avg_at_k([1, 0], ["a", "a"], ["s", "t"])


def test_length_mismatch_and_bad_values() -> None:
    with pytest.raises(ValueError, match="same length"):
        avg_at_k([1, 0], ["a"], ["s", "s"])
    with pytest.raises(ValueError, match="bool or 0/1"):
        avg_at_k([0.5], ["a"], ["s"])
    with pytest.raises(ValueError, match="bool or 0/1"):
        avg_at_k([-1.0], ["a"], ["s"])


def test_empty_input_gives_no_metrics() -> None:
    assert avg_at_k([], [], []) == {}


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.booleans(), min_size=3, max_size=3), min_size=1, max_size=20))
def test_mean_equals_flat_mean_when_groups_are_equal(groups: list[list[bool]]) -> None:
    acc = [a for g in groups for a in g]
    gids = [i for i, g in enumerate(groups) for _ in g]
    out = avg_at_k(acc, gids, ["s"] * len(acc))
    assert out["val-core/s/acc/mean@3"] == pytest.approx(np.mean(acc))
    assert out["val-aux/s/pass@3"] == pytest.approx(np.mean([any(g) for g in groups]))
    assert 0.0 <= out["val-aux/s/acc/problem_std@3"] <= 0.5


def test_held_out_accuracy_reads_mean_at_k_only_not_the_best_and_maj_statistics_beside_it():
    """The warm-up stopped on a mean over every val-core key once verl's best@n/maj@n (and their
    standard deviations) joined acc/mean@k there: 0.206 "in the band" for a policy at 0.133."""
    from dapo_megatron.demo import held_out_curve
    from dapo_megatron.observability.tracking import format_console_line
    from dapo_megatron.reward.val_metrics import held_out_accuracy, is_held_out_accuracy
    from dapo_megatron.sft import held_out_accuracy as warmup_accuracy

    metrics = {
        "val-core/a/acc/mean@8": 0.1,
        "val-core/b/acc/mean@8": 0.3,
        "val-core/a/acc/best@8/mean": 0.9,
        "val-core/a/acc/best@8/std": 0.05,
        "val-core/a/acc/maj@8/mean": 0.4,
        "val-aux/a/acc/sem@8": 0.01,
    }
    assert [k for k in metrics if is_held_out_accuracy(k)] == ["val-core/a/acc/mean@8", "val-core/b/acc/mean@8"]
    assert held_out_accuracy(metrics) == pytest.approx(0.2) == warmup_accuracy(metrics)
    assert held_out_accuracy({"val-aux/a/acc/sem@8": 0.1}) is None
    assert "val 0.200" in format_console_line(3, metrics)
    assert held_out_curve([{"step": 3, **metrics}])[0][1] == pytest.approx(0.2)
