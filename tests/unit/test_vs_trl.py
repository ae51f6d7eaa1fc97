"""bench/vs_trl.py's pure parts: the overrides it hands our trainer, and the reward it hands TRL."""

import importlib.util
from pathlib import Path

import pytest

from dapo_megatron.config import load_config, validate

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "tiny_cpu.yaml"


@pytest.fixture(scope="module")
def vs_trl():
    spec = importlib.util.spec_from_file_location("vs_trl", ROOT / "bench" / "vs_trl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cfg(vs_trl, tmp_path, *argv):
    args = vs_trl.parse_args(["--sft-model", "m", "--task-dir", "t", "--config", str(CONFIG), *argv])
    return load_config(str(CONFIG), vs_trl.build_overrides(args, tmp_path / "ours"))


def test_defaults_mirror_the_demo_and_are_valid_for_two_processes(vs_trl, tmp_path):
    cfg = _cfg(vs_trl, tmp_path)
    validate(cfg, world_size=2)
    assert (cfg.data.gen_batch_size, cfg.data.train_batch_size, cfg.rollout.n) == (32, 32, 8)
    assert cfg.data.train_batch_size // cfg.actor.ppo_mini_batch_size == 2
    assert cfg.actor.optim.lr == 2e-4 and cfg.actor.optim.lr_warmup_steps == 10
    assert cfg.trainer.checkpoint.save_freq == -1 and not cfg.rollout.weight_sync.verify
    assert cfg.data.train_files == [str(Path("t").resolve() / "train.parquet")]


def test_command_line_settings_reach_our_config(vs_trl, tmp_path):
    cfg = _cfg(vs_trl, tmp_path, "--prompts-per-step", "12", "--mini-batches", "3", "--n", "4", "--val-n", "2")
    assert cfg.actor.ppo_mini_batch_size == 4 and cfg.rollout.n == 4 and cfg.rollout.val.n == 2
    assert (cfg.data.seed, cfg.rollout.seed) == (0, 0)


def test_prompts_must_split_into_the_mini_batches(vs_trl):
    with pytest.raises(SystemExit):
        vs_trl.parse_args(["--prompts-per-step", "10", "--mini-batches", "3"])


def test_settings_trl_cannot_express_are_refused(vs_trl, tmp_path):
    cfg = _cfg(vs_trl, tmp_path)
    vs_trl.check_comparable(cfg)
    cfg.algorithm.loss_agg_mode = "seq-mean-token-mean"
    with pytest.raises(SystemExit, match="loss_agg_mode"):
        vs_trl.check_comparable(cfg)


def test_trl_reward_is_our_score_plus_overlong_shaping_and_counts_tokens(vs_trl, tmp_path):
    cfg = _cfg(vs_trl, tmp_path)  # max_response_length 32, overlong buffer 8, penalty 1
    reward = vs_trl.ShapedMathDapoReward(cfg)
    completions = [
        [{"role": "assistant", "content": "12+5=17\nAnswer: 17"}],  # conversational form
        "Answer: 18",  # plain text form
        "Answer: 17",
    ]
    out = reward(
        prompts=["p"] * 3,
        completions=completions,
        completion_ids=[[1] * 10, [1] * 28, [1] * 32],
        ground_truth=["17", "17", "17"],
        trainer_state=None,
    )
    assert out == pytest.approx([1.0, -1.5, 0.0])  # 28 tokens: 4 into the buffer of 8 -> -0.5; 32 -> -1
    assert reward.generated_tokens == 70 and reward.calls == 1
