"""Rollout interface pieces that need no engine: dataclasses, sampling params, replica layout, mismatch."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dapo_megatron.config import RolloutConfig, ValSamplingConfig
from dapo_megatron.contract import Rollouts
from dapo_megatron.rollout.engine import SamplingSpec
from dapo_megatron.rollout.layout import RolloutLayout, prompt_slices
from dapo_megatron.rollout.mismatch import logprob_mismatch
from dapo_megatron.rollout.sampling import request_seed, to_vllm_sampling_params, train_sampling, val_sampling


# ------------------------------------------------------------------ Rollouts
def _rollouts(**over) -> Rollouts:
    kw = dict(
        num_prompts=2,
        n=2,
        prompt_index=[0, 0, 1, 1],
        response_ids=[[5, 6], [7], [8, 9, 10], []],
        logprobs=[[-0.1, -0.2], [-0.3], [-1.0, -2.0, -3.0], []],
        finish_reason=["stop", "length", "stop", "stop"],
    )
    kw.update(over)
    return Rollouts(**kw)


def test_rollouts_accessors():
    ro = _rollouts()
    assert len(ro) == 4 and ro.lengths == [2, 1, 3, 0]
    assert ro.truncated == [False, True, False, False]


@pytest.mark.parametrize(
    ("over", "match"),
    [
        (dict(finish_reason=["stop", "abort", "stop", "stop"]), "finish_reason has values \\['abort'\\]"),
        (dict(logprobs=[[-0.1], [-0.3], [-1.0, -2.0, -3.0], []]), "response 0: 2 token ids but 1 log-probs"),
        (dict(prompt_index=[0, 1, 0, 1]), "grouped by prompt"),
        (dict(response_ids=[[1]] * 3), "response_ids has 3 entries, expected num_prompts\\*n = 4"),
    ],
)
def test_rollouts_validation_names_the_field(over, match):
    with pytest.raises(ValueError, match=match):
        _rollouts(**over)


# ------------------------------------------------------------------ sampling
def test_sampling_spec_validation_lists_all_problems():
    with pytest.raises(ValueError) as info:
        SamplingSpec(temperature=-1, top_p=0, top_k=0, max_tokens=0)
    msg = str(info.value)
    for field in ("temperature", "top_p", "top_k", "max_tokens"):
        assert field in msg


def test_train_and_val_sampling_from_config():
    cfg = RolloutConfig(temperature=0.9, top_p=0.95, top_k=20, stop=["</answer>"])
    spec = train_sampling(cfg, max_response_length=64)
    assert spec == SamplingSpec(temperature=0.9, top_p=0.95, top_k=20, max_tokens=64, stop=("</answer>",))
    val = val_sampling(ValSamplingConfig(temperature=1.0, top_p=0.7), 64)
    assert val.top_p == 0.7 and val.max_tokens == 64 and not val.greedy
    greedy = val_sampling(ValSamplingConfig(do_sample=False, top_p=0.7, top_k=5), 32)
    assert greedy.greedy and greedy.top_p == 1.0 and greedy.top_k == -1


def test_to_vllm_sampling_params():
    params = to_vllm_sampling_params(SamplingSpec(temperature=0.7, top_k=-1, max_tokens=9), n=4, seed=11)
    assert params.n == 4 and params.seed == 11 and params.max_tokens == 9
    assert params.top_k == 0  # vLLM's "off"
    assert params.logprobs == 0  # the sampled token's log-prob only
    assert params.detokenize is False  # token ids in, token ids out (no stop strings)


def test_request_seed_unique_per_sample_and_layout_free():
    n = 4
    seeds = set()
    for i in range(50):
        s = request_seed(7, i, n)
        seeds.update(range(s, s + n))  # vLLM gives sample j the seed s + j
    assert len(seeds) == 50 * n
    assert request_seed(7, 3, n) != request_seed(8, 3, n)
    with pytest.raises(ValueError, match="n must be"):
        request_seed(0, 0, 0)


def test_rollout_dtype_names():
    from dapo_megatron.rollout.vllm_engine import torch_dtype

    assert torch_dtype("bfloat16") is torch.bfloat16 and torch_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="rollout.dtype must be one of .* got 'fp8'"):
        torch_dtype("fp8")


# ------------------------------------------------------------------ layout
def test_layout_groups_and_prompt_slices():
    lay = RolloutLayout(world_size=8, rank=5, tp=2)
    assert lay.dp == 4 and lay.replica == 2 and lay.rank_in_replica == 1 and not lay.is_replica_leader
    assert lay.my_prompts(10) == range(6, 8)  # slices of 3, 3, 2, 2
    with pytest.raises(ValueError, match="tensor_model_parallel_size=3 does not divide the world size 8"):
        RolloutLayout(world_size=8, rank=0, tp=3)


@given(num=st.integers(0, 100), dp=st.integers(1, 9))
def test_prompt_slices_partition(num, dp):
    slices = prompt_slices(num, dp)
    assert [i for s in slices for i in s] == list(range(num))
    sizes = [len(s) for s in slices]
    assert max(sizes) - min(sizes) <= 1


# ------------------------------------------------------------------ mismatch
def test_logprob_mismatch_metrics():
    actor = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, 0.0, 0.0]])
    engine = torch.tensor([[-1.1, -2.0, 5.0], [-0.3, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    m = logprob_mismatch(actor, engine, mask)
    assert m["tokens"] == 3
    assert m["mean_abs_diff"] == pytest.approx((0.1 + 0.0 + 0.2) / 3)
    assert m["max_abs_diff"] == pytest.approx(0.2)
    log_r = torch.tensor([0.1, 0.0, -0.2], dtype=torch.float64)
    assert m["kl_k1"] == pytest.approx(float((-log_r).mean()))
    assert m["kl_k3"] == pytest.approx(float((log_r.exp() - 1 - log_r).mean()))
    assert m["ppl_ratio"] == pytest.approx(math.exp(float((-log_r).mean())))
    same = logprob_mismatch(actor, actor, mask)
    assert same["mean_abs_diff"] == 0 and same["kl_k3"] == 0


def test_logprob_mismatch_errors():
    a = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="rollout_logprobs \\(2, 2\\)"):
        logprob_mismatch(a, torch.zeros(2, 2), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="no tokens"):
        logprob_mismatch(a, a, torch.zeros(2, 3, dtype=torch.bool))
    bad = a.clone()
    bad[0, 0] = float("-inf")
    with pytest.raises(ValueError, match="actor_logprobs has non-finite"):
        logprob_mismatch(bad, a, torch.ones(2, 3, dtype=torch.bool))
