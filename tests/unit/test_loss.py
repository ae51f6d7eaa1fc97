"""DAPO policy loss: clip branches, metrics, gradients and exact split aggregation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dapo_megatron.algo.loss import (
    LOSS_AGG_MODES,
    aggregate_loss,
    local_normalizer,
    masked_mean,
    masked_sum,
    policy_loss,
)

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def batches(draw, min_b: int = 1, max_b: int = 6, max_t: int = 7):
    """A random [B, T] problem; seeds keep the tensors cheap to generate."""
    b = draw(st.integers(min_b, max_b))
    t = draw(st.integers(1, max_t))
    seed = draw(st.integers(0, 2**31 - 1))
    p_valid = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    gen = torch.Generator().manual_seed(seed)
    log_prob = -torch.rand(b, t, generator=gen, dtype=torch.float64) * 3
    old_log_prob = log_prob + 0.5 * torch.randn(b, t, generator=gen, dtype=torch.float64)
    advantages = torch.randn(b, generator=gen, dtype=torch.float64)
    mask = torch.rand(b, t, generator=gen) < p_valid
    return log_prob, old_log_prob, advantages, mask


# The hand-computed 2x3 example. Row 0 has A = +1, row 1 has A = -1.
#   (0,0) r=1.0  -> L = -1
#   (0,1) r=1.5  -> clipped high: L = -1.28        (clipfrac)
#   (0,2) r=0.5  -> A>0 below 1-eps: unclipped, L = -0.5
#   (1,0) r=0.5  -> clipped low: L = 0.8            (clipfrac)
#   (1,1) r=1.1  -> inside the range: L = 1.1
#   (1,2) r=20   -> dual clip: min(c=10, 20) = 10   (clipfrac_lower)
RATIOS = torch.tensor([[1.0, 1.5, 0.5], [0.5, 1.1, 20.0]], dtype=torch.float64)
ADV = torch.tensor([1.0, -1.0], dtype=torch.float64)
EXPECTED_TOKEN_LOSS = torch.tensor([[-1.0, -1.28, -0.5], [0.8, 1.1, 10.0]], dtype=torch.float64)


def _hand_example(requires_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    old = torch.full((2, 3), -2.0, dtype=torch.float64)
    new = (old + RATIOS.log()).clone().requires_grad_(requires_grad)
    return new, old


def test_hand_example_every_clip_branch() -> None:
    new, old = _hand_example()
    mask = torch.ones(2, 3, dtype=torch.bool)
    out = policy_loss(new, old, ADV, mask)
    assert out["pg_loss"].item() == pytest.approx(EXPECTED_TOKEN_LOSS.mean().item())
    assert out["pg_loss"].item() == pytest.approx(9.12 / 6)
    assert out["pg_clipfrac"].item() == pytest.approx(2 / 6)
    assert out["pg_clipfrac_lower"].item() == pytest.approx(1 / 6)
    assert out["ppo_kl"].item() == pytest.approx(-RATIOS.log().mean().item())


def test_hand_example_masked_token_and_float_mask() -> None:
    new, old = _hand_example()
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    out = policy_loss(new, old, ADV, mask)
    assert out["pg_loss"].item() == pytest.approx((9.12 - 10.0) / 5)
    assert out["pg_clipfrac"].item() == pytest.approx(2 / 5)
    assert out["pg_clipfrac_lower"].item() == 0.0


def test_dual_clip_disabled_with_none() -> None:
    new, old = _hand_example()
    out = policy_loss(new, old, ADV, torch.ones(2, 3), clip_ratio_c=None)
    assert out["pg_loss"].item() == pytest.approx((9.12 - 10.0 + 20.0) / 6)
    assert out["pg_clipfrac_lower"].item() == 0.0


def test_gradient_zero_exactly_where_clipped() -> None:
    new, old = _hand_example(requires_grad=True)
    mask = torch.ones(2, 3, dtype=torch.bool)
    policy_loss(new, old, ADV, mask)["pg_loss"].backward()
    clipped = torch.tensor([[False, True, False], [True, False, True]])
    grad = new.grad
    assert torch.all(grad[clipped] == 0)
    assert torch.all(grad[~clipped] != 0)
    # d/dlogp of -A r / N is -A r / N for the unclipped tokens.
    expected = -(ADV[:, None] * RATIOS) / 6
    torch.testing.assert_close(grad[~clipped], expected[~clipped])


def test_advantages_per_token_equals_broadcast() -> None:
    new, old = _hand_example()
    mask = torch.ones(2, 3)
    a = policy_loss(new, old, ADV, mask)
    b = policy_loss(new, old, ADV[:, None].expand(2, 3).clone(), mask)
    for key in a:
        torch.testing.assert_close(a[key], b[key])


@SETTINGS
@given(batches())
def test_ratio_one_loss_is_minus_mean_advantage(batch) -> None:
    log_prob, _, advantages, mask = batch
    out = policy_loss(log_prob, log_prob.clone(), advantages, mask)
    per_token = advantages[:, None].expand_as(log_prob)
    expected = -per_token[mask].mean().item() if mask.any() else 0.0
    assert out["pg_loss"].item() == pytest.approx(expected, abs=1e-12)
    assert out["pg_clipfrac"].item() == 0.0
    assert out["ppo_kl"].item() == 0.0


@SETTINGS
@given(batches(), st.sampled_from(LOSS_AGG_MODES))
def test_metrics_are_fractions_and_detached(batch, mode) -> None:
    log_prob, old, advantages, mask = batch
    log_prob = log_prob.clone().requires_grad_(True)
    out = policy_loss(log_prob, old, advantages, mask, loss_agg_mode=mode)
    for key in ("pg_clipfrac", "pg_clipfrac_lower"):
        assert 0.0 <= out[key].item() <= 1.0
    # The dual clip can only fire on negative-advantage tokens.
    negative = (advantages[:, None] < 0).expand_as(mask)
    assert out["pg_clipfrac_lower"].item() <= masked_mean(negative.double(), mask).item() + 1e-12
    for key in ("pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"):
        assert not out[key].requires_grad
    assert out["pg_loss"].requires_grad
    assert math.isfinite(out["pg_loss"].item())


@SETTINGS
@given(batches(max_b=8), st.data())
def test_split_micro_batches_sum_to_global_loss(batch, data) -> None:
    """Sum of per-chunk losses with global normalisers == the unsplit loss, every mode.

    Chunks are also trimmed to their own last valid column, as dynamic padding
    does, so seq-mean-token-sum-norm needs the configured max_response_length.
    """
    log_prob, old, advantages, mask = batch
    b, t = mask.shape
    loss = (log_prob - old) * advantages[:, None]
    cuts = sorted(data.draw(st.lists(st.integers(1, max(1, b - 1)), max_size=3, unique=True)))
    bounds = [0, *[c for c in cuts if c < b], b]
    chunks = [(lo, hi) for lo, hi in itertools.pairwise(bounds) if hi > lo]
    for mode in LOSS_AGG_MODES:
        full = aggregate_loss(loss, mask, mode)
        total = sum(int(local_normalizer(mask[lo:hi], mode)) for lo, hi in chunks)
        parts = []
        for lo, hi in chunks:
            m = mask[lo:hi]
            valid_cols = torch.nonzero(m.any(0))
            width = int(valid_cols.max()) + 1 if valid_cols.numel() else 1
            kwargs = {"global_num_tokens": total} if mode == "token-mean" else {"global_num_seqs": total}
            parts.append(
                aggregate_loss(
                    loss[lo:hi, :width],
                    m[:, :width],
                    mode,
                    max_response_length=t,
                    **kwargs,
                )
            )
        assert torch.stack(parts).sum().item() == pytest.approx(full.item(), abs=1e-10), mode


def test_policy_loss_split_with_global_num_tokens() -> None:
    gen = torch.Generator().manual_seed(0)
    log_prob = -torch.rand(6, 5, generator=gen, dtype=torch.float64)
    old = log_prob + 0.3 * torch.randn(6, 5, generator=gen, dtype=torch.float64)
    adv = torch.randn(6, generator=gen, dtype=torch.float64)
    mask = torch.rand(6, 5, generator=gen) < 0.6
    full = policy_loss(log_prob, old, adv, mask)["pg_loss"]
    n = int(mask.sum())
    parts = [
        policy_loss(log_prob[s], old[s], adv[s], mask[s], global_num_tokens=n)["pg_loss"]
        for s in (slice(0, 1), slice(1, 4), slice(4, 6))
    ]
    assert sum(p.item() for p in parts) == pytest.approx(full.item())
    # A tensor normaliser (as returned by an all-reduce) works the same.
    tensor_part = policy_loss(log_prob, old, adv, mask, global_num_tokens=torch.tensor(n))["pg_loss"]
    assert tensor_part.item() == pytest.approx(full.item())


def test_concrete_modes() -> None:
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert aggregate_loss(loss, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert aggregate_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx(10 / 9)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum-norm", max_response_length=5).item() == pytest.approx(10 / 15)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_empty_mask_gives_zero_with_graph(mode: str) -> None:
    log_prob = torch.randn(3, 4, requires_grad=True)
    old = torch.randn(3, 4)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    out = policy_loss(log_prob, old, torch.randn(3), mask, loss_agg_mode=mode)
    assert out["pg_loss"].item() == 0.0
    out["pg_loss"].backward()
    assert torch.all(log_prob.grad == 0)
    for key in ("pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"):
        assert out[key].item() == 0.0
    zero_global = aggregate_loss(log_prob, mask, mode, global_num_tokens=0, global_num_seqs=0)
    assert zero_global.item() == 0.0


def test_nan_padding_does_not_leak() -> None:
    log_prob = torch.tensor([[-1.0, float("nan")], [-0.5, float("-inf")]], requires_grad=True)
    old = torch.tensor([[-1.1, float("-inf")], [-0.4, float("-inf")]])
    mask = torch.tensor([[True, False], [True, False]])
    adv = torch.tensor([[1.0, float("nan")], [-1.0, float("inf")]])
    out = policy_loss(log_prob, old, adv, mask)
    out["pg_loss"].backward()
    assert all(math.isfinite(v.item()) for v in out.values())
    assert torch.isfinite(log_prob.grad).all()
    assert torch.all(log_prob.grad[:, 1] == 0)


def test_masked_helpers() -> None:
    x = torch.tensor([[1.0, 2.0, float("nan")], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert masked_sum(x, mask).item() == 3.0
    assert masked_mean(x, mask).item() == 1.5
    torch.testing.assert_close(masked_mean(x, mask, dim=-1), torch.tensor([1.5, 0.0]))
    torch.testing.assert_close(masked_sum(x, mask.bool(), dim=0), torch.tensor([1.0, 2.0, 0.0]))


@pytest.mark.parametrize("c", [1.0, 0.5, -3.0])
def test_clip_ratio_c_must_exceed_one(c: float) -> None:
    new, old = _hand_example()
    with pytest.raises(ValueError, match="clip_ratio_c"):
        policy_loss(new, old, ADV, torch.ones(2, 3), clip_ratio_c=c)


def test_other_bad_arguments() -> None:
    new, old = _hand_example()
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match="token-mean, seq-mean-token-sum, seq-mean-token-mean"):
        policy_loss(new, old, ADV, mask, loss_agg_mode="sequence-mean")
    with pytest.raises(ValueError, match="seq-mean-token-sum-norm"):
        aggregate_loss(new, mask, "bogus")
    with pytest.raises(ValueError, match="clip_ratio_low"):
        policy_loss(new, old, ADV, mask, clip_ratio_low=1.0)
    with pytest.raises(ValueError, match="clip_ratio_high"):
        policy_loss(new, old, ADV, mask, clip_ratio_high=-0.1)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(new, old, torch.zeros(3), mask)
    with pytest.raises(ValueError, match="global_num_tokens"):
        aggregate_loss(new, mask, "token-mean", global_num_tokens=-1)
    with pytest.raises(ValueError, match="max_response_length"):
        aggregate_loss(new, mask, "seq-mean-token-sum-norm", max_response_length=0)


def test_ppo_kl_clamps_the_log_ratio_at_20_as_the_ratio_does() -> None:
    """verl's ppo_kl is the mean of -clamp(log-ratio, -20, 20): 20 here, where the unclamped mean is 35."""
    old = torch.zeros(1, 2)
    new = torch.tensor([[-50.0, -20.0]])
    out = policy_loss(new, old, torch.ones(1), torch.ones(1, 2, dtype=torch.bool))
    assert out["ppo_kl"].item() == pytest.approx(20.0)
    new = torch.tensor([[30.0, -50.0]])
    out = policy_loss(new, old, torch.ones(1), torch.ones(1, 2, dtype=torch.bool))
    assert out["ppo_kl"].item() == pytest.approx((-20.0 + 20.0) / 2)
