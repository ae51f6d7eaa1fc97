"""Bad input stops a run early with a message that names the problem, before anything heavy starts."""

from __future__ import annotations

import math

import pytest

from dapo_megatron.builder import Builder
from dapo_megatron.config import ConfigError, load_config
from dapo_megatron.data.parquet_dataset import DataError
from tests.e2e._runs import TINY, metric_rows, package_tracebacks, run, train_args

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
        Builder(cfg).build()


def test_malformed_data_file_is_named(tiny_task, tmp_path, two_processes):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: cannot be read as parquet"):
        Builder(_cfg(tiny_task, tmp_path, f"data.train_files=[{bad}]")).build()


def test_empty_data_set_after_filtering_says_why(tiny_task, tmp_path, two_processes):
    cfg = _cfg(tiny_task, tmp_path, "data.max_prompt_length=4")
    with pytest.raises(DataError, match=r"2000 dropped as longer than max_prompt_length=4"):
        Builder(cfg).build()


def test_config_that_does_not_fit_the_world_size(tiny_task, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"tensor \(2\) x pipeline \(1\) = 2 does not divide the world size 3"):
        Builder(_cfg(tiny_task, tmp_path)).build()


def test_config_error_under_torchrun_is_printed_once_without_traceback(tiny_task, tmp_path):
    """Both ranks meet the error; rank 0 prints it, both exit with code 2 (torchrun reports it)."""
    args = [*tiny_task.data_overrides(), f"actor.model_path={tiny_task.init_model}", "trainer.n_gpus_per_node=3"]
    proc = run(train_args(tmp_path / "out", *args), log=tmp_path / "run.log", timeout=300)
    assert proc.returncode != 0
    message = (
        "error: ConfigError: invalid configuration (1 problem(s)):\n  - trainer.n_gpus_per_node: "
        "trainer.nnodes x trainer.n_gpus_per_node = 3 but the job has 2 processes\n"
    )
    assert proc.stdout.count(message) == 1, proc.stdout
    assert "exitcode  : 2" in proc.stdout, proc.stdout  # the other rank may be stopped by torchrun first
    assert not package_tracebacks(proc.stdout), proc.stdout


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


def _nan_args(env, out, *extra: str) -> list[str]:
    return train_args(
        out,
        *env.data_overrides(),
        f"actor.model_path={env.policy}",
        "trainer.val_before_train=false",
        "trainer.test_freq=-1",
        "trainer.checkpoint.save_freq=-1",
        *extra,
    )


def test_nan_loss_drill_skips_steps_then_checkpoints_stops_and_resumes(tiny_env, tmp_path):
    """Steps 2 and 3 get a NaN loss (the fault drill): 2 mini-batches each, 3 skips in a row stop at step 3."""
    out = tmp_path / "out"
    drill = ["actor.inject_nan_loss_at_steps=[2,3]", "actor.max_consecutive_nonfinite=3"]
    proc = run(_nan_args(tiny_env, out, *drill, "trainer.total_training_steps=5"), log=tmp_path / "run.log")
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "3 consecutive optimizer steps had a non-finite loss or gradient norm" in proc.stdout
    assert "actor.max_consecutive_nonfinite=3" in proc.stdout
    assert "optimizer step skipped (2 in a row)" in proc.stdout
    rows = metric_rows(out)
    assert sorted(rows) == [1, 2], sorted(rows)  # step 3 raised before its row
    assert rows[1]["actor/nonfinite_skips"] == 0.0 and math.isfinite(rows[1]["actor/grad_norm"])
    assert rows[2]["actor/nonfinite_skips"] == 2.0 and math.isnan(rows[2]["actor/pg_loss"])
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000003"

    # The fixed config resumes from that checkpoint and trains normally.
    proc = run(_nan_args(tiny_env, out, "trainer.total_training_steps=4"), log=tmp_path / "resume.log")
    assert proc.returncode == 0, proc.stdout[-3000:]
    rows = metric_rows(out)
    assert sorted(rows) == [1, 2, 4], sorted(rows)
    assert rows[4]["actor/nonfinite_skips"] == 0.0 and math.isfinite(rows[4]["actor/pg_loss"])


def test_overflowed_weights_stop_without_a_checkpoint(tiny_env, tmp_path):
    """lr 1e30 overflows the weights in the first update (no fault injected); the next step's
    log-probs are non-finite, and the run stops naming the cause instead of saving broken weights."""
    out = tmp_path / "out"
    overflow = ["actor.optim.lr=1e30", "actor.optim.lr_warmup_steps=0", "algorithm.filter_groups.enable=false"]
    proc = run(_nan_args(tiny_env, out, *overflow, "trainer.total_training_steps=4"), log=tmp_path / "run.log")
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "the actor's log-probs of the sampled responses are non-finite" in proc.stdout
    assert (
        "These weights are not checkpointed; resume from the initial model with a lower actor.optim.lr" in proc.stdout
    )
    assert not (out / "checkpoints" / "latest").exists()


FLAKY_REWARD = """
import time
import zlib

from dapo_megatron.reward.math_dapo import compute_score as exact


def compute_score(solution_str, ground_truth):
    bucket = zlib.crc32(solution_str.encode()) % 40
    if bucket == 0:
        raise ValueError("flaky verifier")
    if bucket == 1:
        time.sleep(30)
    return exact(solution_str, ground_truth)
"""


def test_reward_function_that_raises_or_hangs_is_counted_and_training_goes_on(tiny_env, tmp_path):
    reward = tmp_path / "flaky_reward.py"
    reward.write_text(FLAKY_REWARD)
    out = tmp_path / "out"
    extra = [f"reward.custom_function.path={reward}", "reward.timeout_s=1.0", "trainer.total_training_steps=2"]
    proc = run(_nan_args(tiny_env, out, *extra), log=tmp_path / "run.log")
    assert proc.returncode == 0, proc.stdout[-3000:]
    rows = metric_rows(out)
    assert sorted(rows) == [1, 2]
    assert sum(r["reward/num_errors"] for r in rows.values()) > 0
    assert sum(r["reward/num_timeouts"] for r in rows.values()) > 0
    assert "responses failed and scored -1.0" in proc.stdout
    assert "ValueError: flaky verifier" in proc.stdout
