"""Rounds become groups, and kept groups become the actor's batch, without losing or reordering anything."""

import dataclasses
import io

import pytest
import torch

from dapo_megatron.algo.dynamic_sampling import DynamicSamplingBuffer
from dapo_megatron.config import load_config
from dapo_megatron.contract import PromptRecord, Rollouts, ScoredBatch
from dapo_megatron.experience import (
    advantages_for,
    build_round,
    dp_shard,
    rollout_log_probs,
    to_actor_batch,
)


def _round(n=2, max_len=6):
    cfg = load_config(None, ["data.max_response_length=6", "algorithm.overlong_buffer.len=2", f"rollout.n={n}"])
    records = [
        PromptRecord(uid="p0", prompt_ids=[1, 2, 3], messages=[], ground_truth="4", data_source="s"),
        PromptRecord(uid="p1", prompt_ids=[5], messages=[], ground_truth="6", data_source="s"),
    ]
    responses = [[7, 8], [9, 9, 9, 9, 9, 9], [10], [11, 12, 13, 14, 15]]
    rollouts = Rollouts(
        num_prompts=2,
        n=n,
        prompt_index=[0, 0, 1, 1],
        response_ids=responses,
        logprobs=[[-0.1 * (t + 1) for t in range(len(r))] for r in responses],
        finish_reason=["stop", "length", "stop", "stop"],
    )
    scored = ScoredBatch(
        scores=[1.0, -1.0, -1.0, -1.0], acc=[True, False, False, False], preds=["4", "x", "y", "z"], failed=[None] * 4
    )
    return cfg, records, rollouts, scored


def test_build_round_groups_and_shapes_rewards():
    cfg, records, rollouts, scored = _round()
    result = build_round(cfg, records, rollouts, scored)
    g0, g1 = result.groups
    assert (g0.uid, g1.uid) == ("p0", "p1")
    assert g0.acc == [1.0, 0.0] and g1.acc == [0.0, 0.0]
    # L_max 6, buffer 2: length 6 -> penalty -1 (truncated wrong answer: -2); length 5 -> -0.5
    assert g0.seq_reward == [1.0, -2.0]
    assert g1.seq_reward == [-1.0, -1.5]
    assert g0.score == [1.0, -1.0]  # the raw score is kept apart for filtering
    assert g0.truncated == [False, True]
    assert g1.prompt_ids == [5] and g1.response_ids == [[10], [11, 12, 13, 14, 15]]
    assert g1.rollout_log_probs[0] == pytest.approx([-0.1])
    assert result.scores.tolist() == [1.0, -1.0, -1.0, -1.0] and result.lengths.tolist() == [2, 6, 1, 5]


def test_round_size_mismatches_are_errors():
    cfg, records, rollouts, scored = _round()
    with pytest.raises(ValueError, match="rollouts cover 2 prompts but 1 records"):
        build_round(cfg, records[:1], rollouts, scored)
    short = ScoredBatch(scored.scores[:3], scored.acc[:3], scored.preds[:3], scored.failed[:3])
    with pytest.raises(ValueError, match="3 scores for 4 responses"):
        build_round(cfg, records, rollouts, short)


def test_actor_batch_layout_masks_and_truncation_filter():
    cfg, records, rollouts, scored = _round()
    groups = build_round(cfg, records, rollouts, scored).groups
    adv = advantages_for(groups, norm_by_std=False)
    assert torch.allclose(adv, torch.tensor([1.5, -1.5, 0.25, -0.25]))
    batch = to_actor_batch(groups, max_response_length=6, pad_token_id=0, mask_truncated=False, advantages=adv)
    assert batch.group_size == 2
    assert batch.input_ids[0].tolist()[:5] == [1, 2, 3, 7, 8]
    assert batch.seq_lengths.tolist() == [5, 9, 2, 6]
    assert batch.prompt_lengths.tolist() == [3, 3, 1, 1]
    assert batch.response_mask.sum(1).tolist() == [2, 6, 1, 5]
    filtered = to_actor_batch(groups, max_response_length=6, pad_token_id=0, mask_truncated=True)
    assert filtered.response_mask.sum(1).tolist() == [2, 0, 1, 5]
    lp = rollout_log_probs(groups, 6)
    assert lp.shape == (4, 6) and lp[1, 5].item() == pytest.approx(-0.6) and lp[2, 1].item() == 0.0


def test_dp_shard_keeps_mini_batches_whole_across_ranks():
    cfg, records, rollouts, scored = _round()
    template = build_round(cfg, records, rollouts, scored).groups[0]
    groups = [dataclasses.replace(template, uid=f"g{i}") for i in range(8)]
    shards = [[g.uid for g in dp_shard(groups, mini_batch_groups=4, dp_size=2, dp_rank=r)] for r in range(2)]
    assert shards == [["g0", "g1", "g4", "g5"], ["g2", "g3", "g6", "g7"]]
    # Mini-batch m is the same set of groups whatever the DP size.
    assert [g.uid for g in dp_shard(groups, mini_batch_groups=4, dp_size=1, dp_rank=0)][:4] == ["g0", "g1", "g2", "g3"]
    with pytest.raises(ValueError, match="not divisible by data-parallel size 3"):
        dp_shard(groups, mini_batch_groups=4, dp_size=3, dp_rank=0)
    with pytest.raises(ValueError, match="8 groups do not fill whole mini-batches of 3"):
        dp_shard(groups, mini_batch_groups=3, dp_size=1, dp_rank=0)


def test_a_prompt_drawn_twice_makes_two_groups():
    """Past an epoch the sampler draws a prompt again, in a later round of the same step or in the
    same round when it wraps: the buffer must take both draws, and GRPO must not pool them."""
    cfg, records, rollouts, scored = _round()
    twice = [records[0], records[0]]  # one round that wrapped the epoch: the same prompt at both ends
    first = build_round(cfg, twice, rollouts, scored, draw="7.0").groups
    again = build_round(cfg, records, rollouts, scored, draw="7.1").groups
    assert [g.uid for g in first] == ["p0@7.0.0", "p0@7.0.1"]
    buffer = DynamicSamplingBuffer(4, enable=False)
    buffer.begin_step(7)
    buffer.add_round(first)
    buffer.add_round(again)  # p0 once more, in the step's second round
    groups = buffer.take()
    assert len(groups) == 4
    adv = advantages_for(first, norm_by_std=False)
    assert torch.allclose(adv, torch.tensor([1.5, -1.5, 0.25, -0.25]))  # each draw is its own group


def test_carried_groups_checkpoint_as_plain_containers_and_come_back_typed():
    cfg, records, rollouts, scored = _round()
    kept, carried = build_round(cfg, records, rollouts, scored, draw="1.0").groups
    carried = dataclasses.replace(carried, acc=[0.0, 1.0])  # informative, so the buffer keeps it
    buf = DynamicSamplingBuffer(1, max_carry_age=1)
    buf.begin_step(1)
    buf.add_round([kept, carried])
    assert buf.take() == [kept]  # one group trained, the other carried
    state = buf.state_dict()
    blob = io.BytesIO()
    torch.save(state, blob)
    blob.seek(0)
    restored = DynamicSamplingBuffer(1, max_carry_age=1)
    restored.load_state_dict(torch.load(blob, weights_only=True))  # plain containers only
    assert restored.state_dict() == state
    assert restored.pending == (carried,) and carried.born_step == 1
    restored.begin_step(2)
    assert restored.take() == [carried]
