"""GRPO group-relative advantages against a slow per-group reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dapo_megatron.algo.advantage import grpo_advantage

SETTINGS = settings(max_examples=60, deadline=None)


def reference(scores: torch.Tensor, ids: list, eps: float, norm_by_std: bool) -> torch.Tensor:
    """The note's definition written as the obvious loop over samples."""
    out = torch.empty_like(scores)
    for i, gid in enumerate(ids):
        members = torch.stack([scores[j] for j, other in enumerate(ids) if other == gid])
        if members.numel() == 1:
            mean, std = (
                torch.tensor(0.0, dtype=scores.dtype),
                torch.tensor(1.0, dtype=scores.dtype),
            )
        else:
            mean, std = members.mean(), members.std()
        out[i] = (scores[i] - mean) / (std + eps) if norm_by_std else scores[i] - mean
    return out


@st.composite
def grouped_scores(draw):
    sizes = draw(st.lists(st.integers(1, 5), min_size=1, max_size=6))
    kinds = draw(st.sampled_from(["str", "int"]))
    ids = [f"uid-{g}" if kinds == "str" else 100 - g for g, n in enumerate(sizes) for _ in range(n)]
    perm = draw(st.permutations(range(len(ids))))
    ids = [ids[p] for p in perm]
    values = draw(
        st.lists(
            st.one_of(st.sampled_from([-1.0, 0.0, 1.0]), st.floats(-5, 5, allow_nan=False)),
            min_size=len(ids),
            max_size=len(ids),
        )
    )
    return torch.tensor(values, dtype=torch.float64), ids


@SETTINGS
@given(grouped_scores(), st.booleans())
def test_matches_reference_loop(data, norm_by_std) -> None:
    scores, ids = data
    got = grpo_advantage(scores, ids, norm_by_std=norm_by_std)
    torch.testing.assert_close(got, reference(scores, ids, 1e-6, norm_by_std), rtol=1e-9, atol=1e-9)


@SETTINGS
@given(grouped_scores())
def test_zero_mean_within_groups_of_two_or_more(data) -> None:
    scores, ids = data
    adv = grpo_advantage(scores, ids, norm_by_std=False)
    for gid in set(ids):
        idx = [i for i, g in enumerate(ids) if g == gid]
        if len(idx) > 1:
            assert adv[idx].sum().item() == pytest.approx(0.0, abs=1e-9)


@SETTINGS
@given(
    st.lists(
        st.tuples(st.integers(2, 6), st.floats(-3, 3, allow_nan=False)),
        min_size=1,
        max_size=5,
    )
)
def test_constant_groups_get_zero(groups) -> None:
    scores = torch.tensor([v for n, v in groups for _ in range(n)], dtype=torch.float32)
    ids = [g for g, (n, _) in enumerate(groups) for _ in range(n)]
    assert torch.all(grpo_advantage(scores, ids) == 0)
    assert torch.all(grpo_advantage(scores, ids, norm_by_std=False) == 0)


def test_size_one_group_uses_mean_zero_std_one() -> None:
    scores = torch.tensor([1.0, -1.0, 1.0, 0.5])
    adv = grpo_advantage(scores, ["a", "b", "b", "c"], eps=1e-6)
    assert adv[0].item() == pytest.approx(1.0 / (1.0 + 1e-6))
    assert adv[3].item() == pytest.approx(0.5 / (1.0 + 1e-6))
    assert grpo_advantage(scores, ["a", "b", "b", "c"], norm_by_std=False)[0].item() == 1.0


def test_concrete_group_values() -> None:
    # Group of four with one correct answer: mean -0.5, unbiased std 1.
    scores = torch.tensor([1.0, -1.0, -1.0, -1.0])
    adv = grpo_advantage(scores, [7, 7, 7, 7], eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([1.5, -0.5, -0.5, -0.5]))


def test_tensor_ids_match_list_ids_and_dtype_kept() -> None:
    scores = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 3.0])
    ids = [3, 3, 9, 9, 9, -1]
    a = grpo_advantage(scores, ids)
    b = grpo_advantage(scores, torch.tensor(ids))
    torch.testing.assert_close(a, b)
    assert a.dtype == torch.float32


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="group_ids"):
        grpo_advantage(torch.zeros(3), ["a", "b"])
    with pytest.raises(ValueError, match="scores"):
        grpo_advantage(torch.zeros(2, 2), ["a", "b"])
    with pytest.raises(ValueError, match="eps"):
        grpo_advantage(torch.zeros(2), ["a", "b"], eps=-1.0)


def test_empty_batch() -> None:
    assert grpo_advantage(torch.zeros(0), []).shape == (0,)
    assert grpo_advantage(torch.zeros(0), torch.zeros(0, dtype=torch.long)).shape == (0,)
