"""verl's validation metrics: best@n / worst@n / maj@n by seeded bootstrap, mean@k, std@k, names."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from dapo_megatron.reward.val_metrics import (
    bootstrap_indices,
    bootstrap_sizes,
    majority_positions,
    verl_val_metrics,
)


def _literal(values, preds, n, seed=42, draws=1000):
    """The definition step by step: reseed numpy's global generator, draw n indices with
    replacement ``draws`` times, and per draw take the max, the min and the value of the first
    sample carrying the most frequent answer (ties: the answer met first)."""
    np.random.seed(seed)
    best, worst, maj = [], [], []
    for _ in range(draws):
        picked = np.random.choice(len(values), size=n, replace=True)
        vals = [values[i] for i in picked]
        answers = [preds[i] for i in picked]
        counts = Counter(answers)
        top = max(counts.values())
        winner = next(a for a in answers if counts[a] == top)
        best.append(max(vals))
        worst.append(min(vals))
        maj.append(vals[answers.index(winner)])
    return {kind: (np.mean(x), np.std(x)) for kind, x in (("best", best), ("worst", worst), ("maj", maj))}


def test_sizes_are_powers_of_two_below_k_then_k():
    assert bootstrap_sizes(1) == []
    assert bootstrap_sizes(2) == [2]
    assert bootstrap_sizes(3) == [2, 3]
    assert bootstrap_sizes(8) == [2, 4, 8]
    assert bootstrap_sizes(32) == [2, 4, 8, 16, 32]
    assert bootstrap_sizes(12) == [2, 4, 8, 12]


def test_majority_vote_ties_go_to_the_answer_met_first():
    votes = np.array(
        [
            [1, 0, 0, 1],  # 2-2 tie: answer 1 comes first, at column 0
            [0, 1, 1, 2],  # answer 1 wins 2-1-1; its first occurrence is column 1
            [2, 3, 4, 5],  # all differ: the first
            [5, 5, 5, 5],
            [3, 4, 4, 3],  # tie again, 3 first
            [4, 3, 3, 4],
        ]
    )
    assert majority_positions(votes).tolist() == [0, 1, 0, 0, 0, 0]


def test_hand_computed_problem():
    # One problem, 3 samples: answers "7", "9", "9"; only the last is correct.
    values = {"acc": [0.0, 1.0, 0.0], "score": [-1.0, 1.0, -1.0]}
    out = verl_val_metrics(values, ["p"] * 3, ["aime"] * 3, ["7", "9", "9"])
    idx = bootstrap_indices(3, 2)
    # best@2 of acc: a draw is 1 when it holds sample 1; worst@2: when both are sample 1
    hits = (idx == 1).any(-1)
    assert out["val-aux/aime/acc/best@2/mean"] == pytest.approx(hits.mean())
    assert out["val-aux/aime/acc/best@2/std"] == pytest.approx(hits.std())
    assert out["val-aux/aime/acc/worst@2/mean"] == pytest.approx((idx == 1).all(-1).mean())
    # maj@2: two answers either agree or tie, and a tie goes to the first: the first drawn sample
    assert out["val-aux/aime/acc/maj@2/mean"] == pytest.approx(np.mean([values["acc"][a] for a, _ in idx]))
    # maj@3: "9" wins with two or more of samples 1, 2 drawn, and counts as correct only if the
    # first "9" drawn is sample 1; otherwise "7" wins (wrong)
    maj = []
    for draw in bootstrap_indices(3, 3):
        nines = [i for i in draw if i != 0]
        maj.append(1.0 if len(nines) >= 2 and nines[0] == 1 else 0.0)
    assert out["val-core/aime/acc/maj@3/mean"] == pytest.approx(np.mean(maj))
    assert out["val-core/aime/acc/maj@3/std"] == pytest.approx(np.std(maj))
    assert out["val-core/aime/acc/mean@3"] == pytest.approx(1 / 3)
    assert out["val-aux/aime/acc/std@3"] == pytest.approx(np.std([0.0, 1.0, 0.0]))
    assert out["val-aux/aime/score/mean@3"] == pytest.approx(-1 / 3)
    assert out["val-aux/aime/score/best@3/mean"] == pytest.approx(2 * out["val-core/aime/acc/best@3/mean"] - 1)


def test_equals_the_literal_definition_on_random_problems():
    rng = np.random.default_rng(1)
    k, problems = 6, 4
    acc = (rng.random(k * problems) < 0.4).astype(float)
    preds = [str(a) for a in rng.integers(0, 3, size=k * problems)]
    reward = rng.normal(size=k * problems)
    gids = [p for p in range(problems) for _ in range(k)]
    out = verl_val_metrics({"acc": acc, "reward": reward}, gids, ["s"] * len(gids), preds)
    for name, column in (("acc", acc), ("reward", reward)):
        for n in (2, 4, 6):
            want = {kind: [] for kind in ("best", "worst", "maj")}
            for p in range(problems):
                rows = slice(p * k, (p + 1) * k)
                for kind, pair in _literal(list(column[rows]), preds[rows], n).items():
                    want[kind].append(pair)
            for kind, pairs in want.items():
                sec = "val-core" if name == "acc" and n == k and kind in ("best", "maj") else "val-aux"
                assert out[f"{sec}/s/{name}/{kind}@{n}/mean"] == pytest.approx(np.mean([m for m, _ in pairs]))
                assert out[f"{sec}/s/{name}/{kind}@{n}/std"] == pytest.approx(np.mean([s for _, s in pairs]))


def test_names_follow_verl_s_core_and_aux_split():
    gids = ["a"] * 4 + ["b"] * 4
    values = {"acc": [1, 0, 0, 1, 0, 0, 0, 0], "score": [1, -1, -1, 1, -1, -1, -1, -1], "reward": [0.5] * 8}
    out = verl_val_metrics(values, gids, ["math"] * 8, ["1", "2", "2", "1", "x", "y", "x", "z"])
    core = {k for k in out if k.startswith("val-core/")}
    assert core == {
        "val-core/math/acc/mean@4",
        "val-core/math/acc/best@4/mean",
        "val-core/math/acc/best@4/std",
        "val-core/math/acc/maj@4/mean",
        "val-core/math/acc/maj@4/std",
    }
    for var in ("acc", "score", "reward"):
        for metric in ("std@4", "best@2/mean", "worst@4/std", "maj@2/mean"):
            assert f"val-aux/math/{var}/{metric}" in out
    assert out["val-aux/math/score/mean@4"] == -0.5 and out["val-aux/math/reward/mean@4"] == 0.5
    # without acc the core variable is reward, as in verl
    no_acc = verl_val_metrics({"reward": values["reward"]}, gids, ["math"] * 8)
    assert "val-core/math/reward/best@4/mean" in no_acc


def test_no_predictions_no_majority_and_one_sample_only_the_mean():
    out = verl_val_metrics({"acc": [1, 0]}, ["a", "a"], ["s", "s"], ["", ""])
    assert not any("maj@" in k for k in out) and "val-core/s/acc/best@2/mean" in out
    one = verl_val_metrics({"acc": [1, 0]}, ["a", "b"], ["s", "s"], ["1", "2"])
    assert one == {"val-core/s/acc/mean@1": 0.5}


def test_deterministic_and_independent_of_the_global_seed():
    args = ({"acc": [1, 0, 1, 0, 0]}, ["a"] * 5, ["s"] * 5, ["1", "2", "1", "3", "2"])
    np.random.seed(0)
    first = verl_val_metrics(*args)
    np.random.seed(123)
    assert verl_val_metrics(*args) == first
    assert verl_val_metrics(*args, seed=7) != first


def test_bad_input_names_the_column():
    with pytest.raises(ValueError, match=r"values\['score'\] has 1 entries for 2 samples"):
        verl_val_metrics({"acc": [1, 0], "score": [1]}, ["a", "a"], ["s", "s"])
    with pytest.raises(ValueError, match="problem 'a' has samples from data sources"):
        verl_val_metrics({"acc": [1, 0]}, ["a", "a"], ["s", "t"])
