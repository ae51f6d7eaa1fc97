"""Bad input stops a run early with a message that names the problem, before anything heavy starts."""

from __future__ import annotations

import pytest
from _runs import TINY, run, train_args

from dapo_megatron.config import ConfigError, load_config
from dapo_megatron.data.parquet_dataset import DataError
from dapo_megatron.trainer import DapoTrainer

pytestmark = pytest.mark.e2e


def _cfg(env, tmp_path, *extra: str):
    return load_config(
        str(TINY),
        [*env.data_overrides(), f"actor.model_path={env.init_model}", f"trainer.output_dir={tmp_path / 'out'}", *extra],
    )


@pytest.fixture
def two_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")


def test_missing_data_file_is_named(tiny_task, tmp_path, two_processes):
    cfg = _cfg(tiny_task, tmp_path, f"data.train_files=[{tmp_path}/nope.parquet]")
    with pytest.raises(ConfigError, match=r"data\.train_files\[0\]: file not found: .*nope\.parquet"):
        DapoTrainer(cfg).setup()


def test_malformed_data_file_is_named(tiny_task, tmp_path, two_processes):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: cannot be read as parquet"):
        DapoTrainer(_cfg(tiny_task, tmp_path, f"data.train_files=[{bad}]")).setup()


def test_empty_data_set_after_filtering_says_why(tiny_task, tmp_path, two_processes):
    cfg = _cfg(tiny_task, tmp_path, "data.max_prompt_length=4")
    with pytest.raises(DataError, match=r"2000 dropped as longer than max_prompt_length=4"):
        DapoTrainer(cfg).setup()


def test_config_that_does_not_fit_the_world_size(tiny_task, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"tensor \(2\) x pipeline \(1\) = 2 does not divide the world size 3"):
        DapoTrainer(_cfg(tiny_task, tmp_path)).setup()


def test_no_informative_group_within_the_round_limit(tiny_task, tmp_path):
    """A random policy never answers correctly: every group is filtered, and the run says so."""
    out = tmp_path / "out"
    proc = run(
        train_args(
            out,
            *tiny_task.data_overrides(),
            f"actor.model_path={tiny_task.init_model}",
            "algorithm.filter_groups.max_num_gen_batches=2",
            "trainer.val_before_train=false",
        ),
        log=tmp_path / "run.log",
    )
    assert proc.returncode != 0
    assert "dynamic sampling exhausted at step 1: 0 of 8 groups kept after 2 generation rounds" in proc.stdout
    assert "raise max_num_gen_batches or gen_batch_size" in proc.stdout
