"""Truncated importance sampling through token-level advantages is exactly the weighted loss."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dapo_megatron.algo.loss import LOSS_AGG_MODES, aggregate_loss, policy_loss
from dapo_megatron.algo.rollout_correction import (
    rollout_corr_metrics,
    rollout_corr_metrics_over_ranks,
    rollout_corr_partials,
    truncated_is_weights,
)
from tests.verl_names import ROLLOUT_CORR_NAMES


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
    m = rollout_corr_metrics_over_ranks(old, rollout, mask, cap=1.5)
    assert m["rollout_is/capped_frac"] == 0.5 and m["rollout_is/weight_min"] == pytest.approx(math.exp(-0.5))
    with pytest.raises(ValueError, match="cap must be > 0"):
        truncated_is_weights(old, rollout, mask, cap=0.0)
    with pytest.raises(ValueError, match="shapes differ"):
        truncated_is_weights(old, rollout[:, :2], mask, cap=2.0)


LN2, LN4 = math.log(2.0), math.log(4.0)


def _hand_case():
    """Response A: log-ratios ln 4, 0, -ln 4 (weights 4, 1, 1/4); response B: ln 2, then padding;
    response C: no token (a masked truncated response), which no metric counts."""
    old = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, 0.0, 0.0], [-5.0, -5.0, -5.0]], dtype=torch.float64)
    rollout = torch.tensor(
        [[-1.0 - LN4, -1.0, -1.0 + LN4], [-2.0 - LN2, -math.inf, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64
    )
    mask = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])
    return old, rollout, mask


def test_verl_s_token_level_definitions_by_hand():
    m = rollout_corr_metrics_over_ranks(*_hand_case(), cap=2.0)  # no process group: this process's data
    want = {
        # before the cap: w = 4, 1, 1/4, 2
        "rollout_is_mean": 7.25 / 4,
        "rollout_is_max": 4.0,
        "rollout_is_min": 0.25,
        "rollout_is_ratio_fraction_high": 0.25,  # w > 2 (2 itself is not)
        "rollout_is_ratio_fraction_low": 0.25,  # w < 1/2
        # w clamped to [1/2, 2]: 2, 1, 1/2, 2 -> mean 1.375, mean square 2.3125
        "rollout_is_std": math.sqrt(2.3125 - 1.375**2),
        "rollout_is_eff_sample_size": 1.375**2 / 2.3125,
        # per-response mean weight: 1.75 and 2
        "rollout_is_seq_mean": 1.875,
        "rollout_is_seq_std": 0.25 / math.sqrt(2),
        "rollout_is_seq_max": 2.0,
        "rollout_is_seq_min": 1.75,
        "rollout_is_seq_max_deviation": 1.0,
        "rollout_is_seq_fraction_high": 0.0,
        "rollout_is_seq_fraction_low": 0.0,
        # mean old log-prob per response -1, -2; rollout -1, -2 - ln 2
        "training_ppl": (math.e + math.e**2) / 2,
        "training_log_ppl": 1.5,
        "rollout_ppl": (math.e + math.exp(2 + LN2)) / 2,
        "rollout_log_ppl": (3 + LN2) / 2,
        "kl": -LN2 / 4,
        "k3_kl": (3.25 - LN2) / 4,
        "log_ppl_diff": -LN2 / 2,
        "log_ppl_abs_diff": LN2 / 2,
        "log_ppl_diff_max": 0.0,
        "log_ppl_diff_min": -LN2,
        "ppl_ratio": 0.75,
        "chi2_token": (16 + 1 + 0.0625 + 4) / 4 - 1,
        "chi2_seq": (1 + 4) / 2 - 1,
    }
    assert {k: m[f"rollout_corr/{k}"] for k in want} == pytest.approx(want, rel=1e-12)
    # ours, of the weights as applied (capped): 2, 1, 1/4, 2
    assert m["rollout_is/weight_mean"] == pytest.approx(5.25 / 4)
    assert m["rollout_is/weight_min"] == pytest.approx(0.25)
    assert m["rollout_is/capped_frac"] == 0.5
    assert sorted(m) == sorted(ROLLOUT_CORR_NAMES)


def test_a_safety_bound_of_20_as_verl():
    old = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    rollout = torch.tensor([[-30.0, 30.0]], dtype=torch.float64)
    m = rollout_corr_metrics_over_ranks(old, rollout, torch.ones(1, 2, dtype=torch.bool), cap=2.0)
    assert m["rollout_corr/rollout_is_max"] == pytest.approx(math.exp(20.0))
    assert m["rollout_corr/rollout_is_min"] == pytest.approx(math.exp(-20.0))


def _combine_partials(parts):
    """Several shards' partials as one: sums added, maxima maximised (what the all-reduce does)."""
    sums = {k: sum(p[0][k] for p in parts) for k in parts[0][0]}
    maxima = {k: max(p[1][k] for p in parts) for k in parts[0][1]}
    return sums, maxima


def test_shards_combine_to_the_whole_batch():
    """What the all-reduce computes (sums added, maxima maximised) is the whole batch's value,
    for shards of different sizes and one without a response token; rank 0's shard alone is not."""
    g = torch.Generator().manual_seed(3)
    old = -torch.rand(9, 6, generator=g, dtype=torch.float64) * 3
    rollout = old + 0.4 * torch.randn(9, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(9, 6, generator=g) < 0.7
    mask[:, 0] = True
    mask[7:] = False  # the last shard holds only responses without a token
    whole = rollout_corr_metrics(*rollout_corr_partials(old, rollout, mask, cap=1.5), cap=1.5)
    shards = [slice(0, 2), slice(2, 7), slice(7, 9)]
    parts = [rollout_corr_partials(old[s], rollout[s], mask[s], cap=1.5) for s in shards]
    combined = rollout_corr_metrics(*_combine_partials(parts), cap=1.5)
    assert combined == pytest.approx(whole, rel=1e-12)
    first = rollout_corr_metrics(*parts[0], cap=1.5)
    assert first["rollout_corr/rollout_is_mean"] != pytest.approx(whole["rollout_corr/rollout_is_mean"])
    assert rollout_corr_metrics(*parts[2], cap=1.5) == {}
