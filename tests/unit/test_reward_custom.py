"""A reward function from a user's file: loaded early with named errors, scored safely in the pool."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from dapo_megatron.config import ConfigError, load_config
from dapo_megatron.reward.custom import load_file_scorer
from dapo_megatron.reward.pool import RewardPool

ROOT = Path(__file__).resolve().parents[2]

REWARD_FILE = """
import time

def compute_score(solution_str, ground_truth):
    if solution_str == "raise":
        raise ValueError("the verifier choked")
    if solution_str == "hang":
        time.sleep(60)
    ok = solution_str.strip() == ground_truth
    return {"score": 1.0 if ok else -1.0, "acc": ok, "pred": solution_str.strip()}

def as_number(solution_str, ground_truth):
    return 0.5 if solution_str == ground_truth else -0.5

def as_bool(solution_str, ground_truth):
    return True

not_a_function = 3
"""


@pytest.fixture
def reward_file(tmp_path) -> Path:
    path = tmp_path / "my_reward.py"
    path.write_text(REWARD_FILE)
    return path


def test_dict_and_number_results(reward_file):
    scorer = load_file_scorer(str(reward_file), "compute_score")
    assert scorer("4", "4") == {"score": 1.0, "acc": True, "pred": "4"}
    assert pickle.loads(pickle.dumps(scorer))("5", "4")["acc"] is False
    number = load_file_scorer(str(reward_file), "as_number")
    assert number("4", "4") == {"score": 0.5, "acc": True, "pred": ""}
    assert number("5", "4")["acc"] is False
    with pytest.raises(TypeError, match="as_bool returned bool; expected a dict or a number"):
        load_file_scorer(str(reward_file), "as_bool")("4", "4")


def test_wrong_path_or_name_is_named(reward_file, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"reward\.custom_function\.path: file not found: .*nope\.py"):
        load_file_scorer(str(tmp_path / "nope.py"), "compute_score")
    with pytest.raises(AttributeError, match=r"reward\.custom_function\.name: .*my_reward\.py has no function 'score'"):
        load_file_scorer(str(reward_file), "score")
    with pytest.raises(AttributeError, match="no function 'not_a_function'"):
        load_file_scorer(str(reward_file), "not_a_function")


def test_raising_and_hanging_functions_score_minus_one_in_the_pool(reward_file, caplog):
    scorer = load_file_scorer(str(reward_file), "compute_score")
    with RewardPool(scorer=scorer, num_workers=2, timeout_s=1.0) as pool:
        out = pool.score(["4", "raise", "hang", "5"], ["4", "4", "4", "4"])
        metrics = pool.metrics()
    assert out.scores == [1.0, -1.0, -1.0, -1.0]
    assert out.failed[0] is None and out.failed[3] is None
    assert "ValueError: the verifier choked" in out.failed[1]
    assert "timeout" in out.failed[2]
    assert metrics["reward/num_errors"] == 1 and metrics["reward/num_timeouts"] == 1
    assert "2 of 4 responses failed" in caplog.text


def test_config_checks(reward_file, tmp_path):
    tiny = str(ROOT / "configs" / "tiny_cpu.yaml")
    cfg = load_config(tiny, [f"reward.custom_function.path={reward_file}", "reward.custom_function.name=as_number"])
    assert cfg.reward.custom_function.name == "as_number"
    with pytest.raises(ConfigError, match=r"reward\.strict_box_verify: applies to the built-in backends only"):
        load_config(tiny, [f"reward.custom_function.path={reward_file}", "reward.strict_box_verify=true"])
    from dapo_megatron.config import validate

    cfg = load_config(tiny, [f"reward.custom_function.path={tmp_path}/missing.py"])
    with pytest.raises(ConfigError, match=r"reward\.custom_function\.path: file not found: .*missing\.py"):
        validate(cfg, check_files=True)


# verl's signature, called with keywords as verl's reward managers call it
VERL_REWARD_FILE = """
import time

def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    if solution_str == "raise":
        raise ValueError("the verl verifier choked")
    if solution_str == "hang":
        time.sleep(60)
    ok = solution_str.strip() == ground_truth
    if data_source == "as_float":
        return 1.0 if ok else 0.0
    bonus = (extra_info or {}).get("bonus", 0.0)
    return {"score": (1.0 if ok else -1.0) + bonus, "source": data_source}

def three_positional(a, b, c):
    return 0.0
"""


@pytest.fixture
def verl_reward_file(tmp_path) -> Path:
    path = tmp_path / "verl_reward.py"
    path.write_text(VERL_REWARD_FILE)
    return path


def test_verl_signature_is_recognised_and_gets_data_source_and_extra_info(verl_reward_file, reward_file):
    assert load_file_scorer(str(verl_reward_file), "compute_score").style == "verl"
    assert load_file_scorer(str(reward_file), "compute_score").style == "ours"
    with pytest.raises(TypeError, match=r"reward\.custom_function\.name: three_positional .* takes \(a, b, c\)"):
        load_file_scorer(str(verl_reward_file), "three_positional")


def test_verl_reward_file_scores_through_the_pool_with_one_raising_and_one_hanging(verl_reward_file):
    scorer = load_file_scorer(str(verl_reward_file), "compute_score")
    responses = ["4", "5", "4", "0", "raise", "hang"]
    contexts = [
        ("math_dapo", {"bonus": 0.5}),  # a dict without acc: acc = score > 0
        ("math_dapo", {}),
        ("as_float", {}),  # a float: the score
        ("as_float", {}),
        ("math_dapo", {}),
        ("math_dapo", {}),
    ]
    with RewardPool(scorer=scorer, num_workers=2, timeout_s=1.0) as pool:
        out = pool.score(responses, ["4"] * 6, contexts)
        metrics = pool.metrics()
    assert out.scores == [1.5, -1.0, 1.0, 0.0, -1.0, -1.0]
    assert out.acc == [True, False, True, False, False, False]
    assert out.failed[:4] == [None] * 4
    assert "ValueError: the verl verifier choked" in out.failed[4] and "timeout" in out.failed[5]
    assert metrics["reward/num_errors"] == 1 and metrics["reward/num_timeouts"] == 1
