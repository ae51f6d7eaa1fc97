"""Truncated importance sampling through token-level advantages is exactly the weighted loss."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dapo_megatron.algo.loss import LOSS_AGG_MODES, aggregate_loss, policy_loss
from dapo_megatron.algo.rollout_correction import is_weight_metrics, truncated_is_weights


def _per_token_loss(lp, old, adv, low=0.2, high=0.28, c=10.0):
    """The DAPO surrogate written out directly (no aggregation), as the reference."""
    ratio = torch.exp(lp - old)
    l1, l2 = -adv * ratio, -adv * ratio.clamp(1 - low, 1 + high)
    lc = torch.maximum(l1, l2)
    return torch.where(adv < 0, torch.minimum(-adv * c, lc), lc)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), mode=st.sampled_from(LOSS_AGG_MODES), cap=st.floats(0.5, 5.0))
def test_token_advantages_times_weights_equal_the_weighted_loss(seed, mode, cap):
    g = torch.Generator().manual_seed(seed)
    b, t = 5, 7
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    lp = old + 0.5 * torch.randn(b, t, generator=g, dtype=torch.float64)
    rollout = old + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    mask = torch.rand(b, t, generator=g) < 0.8
    w = truncated_is_weights(old, rollout, mask, cap=cap)
    got = policy_loss(lp, old, adv.unsqueeze(-1) * w, mask, loss_agg_mode=mode)["pg_loss"]
    weighted = _per_token_loss(lp, old, adv.unsqueeze(-1).expand(b, t)) * w
    want = aggregate_loss(weighted, mask, mode)
    assert torch.allclose(got, want, atol=1e-12), (got, want)
    plain = policy_loss(lp, old, adv, mask, loss_agg_mode=mode)
    weighted_out = policy_loss(lp, old, adv.unsqueeze(-1) * w, mask, loss_agg_mode=mode)
    assert torch.equal(plain["pg_clipfrac"], weighted_out["pg_clipfrac"])  # branches unchanged for w > 0


def test_weights_are_capped_detached_and_one_outside_the_mask():
    old = torch.tensor([[-1.0, -1.0, -1.0]], requires_grad=True)
    rollout = torch.tensor([[-1.5, -0.5, -9.0]])
    mask = torch.tensor([[True, True, False]])
    w = truncated_is_weights(old, rollout, mask, cap=1.5)
    assert w.tolist()[0][0] == pytest.approx(1.5)  # exp(0.5) = 1.65 -> capped
    assert w.tolist()[0][1] == pytest.approx(math.exp(-0.5))
    assert w.tolist()[0][2] == 1.0
    assert not w.requires_grad
    m = is_weight_metrics(w, mask, cap=1.5)
    assert m["rollout_is/capped_frac"] == 0.5 and m["rollout_is/weight_min"] == pytest.approx(math.exp(-0.5))
    with pytest.raises(ValueError, match="cap must be > 0"):
        truncated_is_weights(old, rollout, mask, cap=0.0)
    with pytest.raises(ValueError, match="shapes differ"):
        truncated_is_weights(old, rollout[:, :2], mask, cap=2.0)
