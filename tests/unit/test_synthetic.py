"""The offline arithmetic task: schema, correctness, held-out split, determinism."""

from __future__ import annotations

import re
from collections import Counter

import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from dapo_megatron.data.parquet_dataset import load_prompt_dataset
from dapo_megatron.data.records import DAPO_PROMPT_TEMPLATE
from dapo_megatron.data.synthetic import TaskPaths, main, make_arithmetic_task

PROBLEM = re.compile(r"What is (\d+) ([+\-*]) (\d+)\?")


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> TaskPaths:
    return make_arithmetic_task(tmp_path_factory.mktemp("task"), num_train=300, num_val=60, seed=1)


def _rows(path):
    return pq.read_table(path).to_pylist()


def test_rows_follow_dapo_schema_and_are_correct(task):
    rows = _rows(task.train)
    assert len(rows) == 300
    for i, r in enumerate(rows):
        assert r["data_source"] == "synthetic_arith"
        assert r["ability"] == "MATH"
        assert r["reward_model"]["style"] == "rule-lighteval/MATH_v2"
        info = r["extra_info"]
        assert info["index"] == i and info["split"] == "train"
        assert r["prompt"] == [
            {
                "role": "user",
                "content": DAPO_PROMPT_TEMPLATE.format(problem=info["problem"]),
            }
        ]
        a, op, b = PROBLEM.fullmatch(info["problem"]).groups()
        expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert r["reward_model"]["ground_truth"] == str(expected)
        assert info["solution"].splitlines()[-1] == f"Answer: {expected}"
        assert len(info["solution"].splitlines()) <= 3
        assert info["num_digits"] == max(len(a), len(b))


def test_val_is_held_out_and_difficulty_is_mixed(task):
    train, val = _rows(task.train), _rows(task.val)
    assert len(val) == 60 and all(r["extra_info"]["split"] == "val" for r in val)
    train_problems = {r["extra_info"]["problem"] for r in train}
    val_problems = {r["extra_info"]["problem"] for r in val}
    assert len(train_problems) == 300 and len(val_problems) == 60
    assert not train_problems & val_problems
    levels = Counter(r["extra_info"]["num_digits"] for r in train)
    assert set(levels) == {1, 2, 3} and min(levels.values()) >= 30
    ops = Counter(PROBLEM.fullmatch(r["extra_info"]["problem"]).group(2) for r in train)
    assert set(ops) == {"+", "-"}
    assert any(r["reward_model"]["ground_truth"].startswith("-") for r in train)


def test_deterministic_bytes(task, tmp_path):
    again = make_arithmetic_task(tmp_path, num_train=300, num_val=60, seed=1)
    for a, b in [(task.train, again.train), (task.val, again.val)]:
        assert a.read_bytes() == b.read_bytes()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (task.tokenizer_dir / name).read_bytes() == (again.tokenizer_dir / name).read_bytes()
    other = make_arithmetic_task(tmp_path / "other", num_train=300, num_val=60, seed=2)
    assert other.train.read_bytes() != task.train.read_bytes()


def test_loader_reads_task_with_short_prompts(task):
    tok = AutoTokenizer.from_pretrained(task.tokenizer_dir)
    ds = load_prompt_dataset([task.train], tok, max_prompt_length=32)
    assert len(ds) == 300 and ds.stats.num_duplicates == 0 and ds.stats.num_too_long == 0
    assert max(len(r.prompt_ids) for r in ds) <= 16
    assert ds[0].uid == "synthetic_arith:0"
    solution = _rows(task.train)[0]["extra_info"]["solution"]
    ids = tok(solution, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == solution


def test_multiplication_and_argument_checks(tmp_path):
    paths = make_arithmetic_task(tmp_path, num_train=20, num_val=5, digits=(1, 2), ops=("*",))
    assert all(" * " in r["extra_info"]["problem"] for r in _rows(paths.train))
    with pytest.raises(ValueError, match="allow only 100"):
        make_arithmetic_task(tmp_path, num_train=100, num_val=1, digits=(1, 1), ops=("+",))
    with pytest.raises(ValueError, match="ops must be"):
        make_arithmetic_task(tmp_path, ops=("/",))
    with pytest.raises(ValueError, match="digits must be"):
        make_arithmetic_task(tmp_path, digits=(0, 2))


def test_cli(tmp_path, capsys):
    assert (
        main(
            [
                "--out",
                str(tmp_path),
                "--num-train",
                "40",
                "--num-val",
                "10",
                "--ops",
                "+,-",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "prompt tokens:" in out and "(40 rows)" in out
    assert len(_rows(tmp_path / "train.parquet")) == 40
    assert (tmp_path / "tokenizer" / "tokenizer.json").exists()
