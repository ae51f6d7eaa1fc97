"""The stage contract refuses a malformed value where it is built, naming the field."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dapo_megatron.contract import ActorBatch, Group, Rollouts


def _group(**over) -> Group:
    kw = dict(
        uid="p@0.0.0",
        prompt_ids=[1, 2],
        response_ids=[[3], [4, 5]],
        rollout_log_probs=[[-0.1], [-0.2, -0.3]],
        truncated=[False, True],
        acc=[1.0, 0.0],
        score=[1.0, -1.0],
        seq_reward=[1.0, -1.5],
    )
    return Group(**{**kw, **over})


def test_group_sizes_follow_the_responses():
    g = _group()
    assert g.size == 2 and g.born_step == 0


@pytest.mark.parametrize("name", ["rollout_log_probs", "truncated", "acc", "score", "seq_reward"])
def test_group_with_a_field_of_the_wrong_length_names_it(name):
    with pytest.raises(ValueError, match=rf"'p@0.0.0': {name} has 1 entries, not 2"):
        _group(**{name: [0.0]})


def test_group_refuses_no_responses_and_log_probs_off_by_a_token():
    with pytest.raises(ValueError, match="no responses"):
        _group(response_ids=[], rollout_log_probs=[], truncated=[], acc=[], score=[], seq_reward=[])
    with pytest.raises(ValueError, match="response 1 has 2 tokens but 1 log-probs"):
        _group(rollout_log_probs=[[-0.1], [-0.2]])


def test_rollouts_and_actor_batch_name_the_field():
    with pytest.raises(ValueError, match="Rollouts.finish_reason has 1 entries"):
        Rollouts(num_prompts=1, n=2, prompt_index=[0, 0], response_ids=[[1], [2]], logprobs=[[0.0], [0.0]],
                 finish_reason=["stop"])  # fmt: skip
    ids = torch.ones((2, 4), dtype=torch.long)
    with pytest.raises(ValueError, match="prompt_lengths must be"):
        ActorBatch(ids, torch.tensor([4, 4]), torch.tensor([1]), torch.zeros((2, 3), dtype=torch.bool))


def test_the_reward_pool_and_the_buffer_import_without_torch():
    """Reward workers start in fresh interpreters: torch there would add seconds to every (re)start."""
    code = "import sys, dapo_megatron.reward.pool, dapo_megatron.algo.dynamic_sampling; print('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
