"""Overlong reward shaping."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dapo_megatron.algo.overlong import apply_overlong_shaping, overlong_penalty

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def configs(draw):
    l_max = draw(st.integers(1, 30000))
    l_buf = draw(st.integers(1, l_max))
    alpha = draw(st.floats(0.0, 5.0, allow_nan=False))
    lengths = draw(st.lists(st.integers(0, l_max), min_size=1, max_size=20))
    return l_max, l_buf, alpha, lengths


@SETTINGS
@given(configs())
def test_penalty_bounds_and_free_zone(cfg) -> None:
    l_max, l_buf, alpha, lengths = cfg
    pen = overlong_penalty(lengths, max_response_length=l_max, buffer_length=l_buf, penalty_factor=alpha)
    assert pen.shape == (len(lengths),)
    assert torch.all(pen <= 0)
    assert torch.all(pen >= -alpha - 1e-4 * max(alpha, 1.0))
    lengths_t = torch.tensor(lengths)
    assert torch.all(pen[lengths_t <= l_max - l_buf] == 0)
    assert pen[lengths_t == l_max].sub(-alpha).abs().le(1e-5 * max(alpha, 1.0)).all()


@SETTINGS
@given(configs())
def test_penalty_is_monotone_in_length(cfg) -> None:
    l_max, l_buf, alpha, _ = cfg
    lengths = torch.arange(max(0, l_max - l_buf - 3), l_max + 1)
    pen = overlong_penalty(lengths, max_response_length=l_max, buffer_length=l_buf, penalty_factor=alpha)
    assert torch.all(pen[1:] <= pen[:-1])


def test_recipe_values() -> None:
    kw = {"max_response_length": 20480, "buffer_length": 4096, "penalty_factor": 1.0}
    pen = overlong_penalty(torch.tensor([100, 16384, 16385, 18432, 20480]), **kw)
    torch.testing.assert_close(pen, torch.tensor([0.0, 0.0, -1 / 4096, -0.5, -1.0]))
    shaped = apply_overlong_shaping(torch.tensor([-1.0, 1.0]), torch.tensor([20480, 18432]), enable=True, **kw)
    torch.testing.assert_close(shaped, torch.tensor([-2.0, 0.5]))


def test_disabled_shaping_returns_copy_and_allows_none() -> None:
    scores = torch.tensor([1.0, -1.0])
    out = apply_overlong_shaping(
        scores,
        [10, 20],
        enable=False,
        max_response_length=None,
        buffer_length=None,
        penalty_factor=None,
    )
    torch.testing.assert_close(out, scores)
    out[0] = 5.0
    assert scores[0].item() == 1.0
    with pytest.raises(ValueError, match="buffer_length"):
        apply_overlong_shaping(
            scores,
            [10, 20],
            enable=True,
            max_response_length=8,
            buffer_length=None,
            penalty_factor=1.0,
        )


def test_int_scores_become_float() -> None:
    out = apply_overlong_shaping(
        torch.tensor([1, 0]),
        [8, 8],
        enable=True,
        max_response_length=8,
        buffer_length=4,
        penalty_factor=1.0,
    )
    torch.testing.assert_close(out, torch.tensor([0.0, -1.0]))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (
            {"max_response_length": 10, "buffer_length": 0, "penalty_factor": 1.0},
            "buffer_length",
        ),
        (
            {"max_response_length": 10, "buffer_length": -2, "penalty_factor": 1.0},
            "buffer_length",
        ),
        (
            {"max_response_length": 10, "buffer_length": 11, "penalty_factor": 1.0},
            "buffer_length",
        ),
        (
            {"max_response_length": 0, "buffer_length": 1, "penalty_factor": 1.0},
            "max_response_length",
        ),
        (
            {"max_response_length": 10, "buffer_length": 5, "penalty_factor": -1.0},
            "penalty_factor",
        ),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name) -> None:
    with pytest.raises(ValueError, match=name):
        overlong_penalty([1, 2], **kwargs)


def test_bad_lengths() -> None:
    with pytest.raises(ValueError, match="response_lengths"):
        overlong_penalty([-1], max_response_length=10, buffer_length=5, penalty_factor=1.0)
    with pytest.raises(ValueError, match="response_lengths"):
        overlong_penalty([[1]], max_response_length=10, buffer_length=5, penalty_factor=1.0)
