"""A run killed with SIGKILL mid-step and resumed repeats the uninterrupted run exactly."""

from __future__ import annotations

import signal
import time

import pytest
from _runs import deterministic, kill_tree, metric_rows, run, run_until, signal_workers, start, train_args, wait_for

pytestmark = pytest.mark.e2e

STEPS = 5


def _overrides(env, *extra: str) -> list[str]:
    return [
        *env.data_overrides(),
        f"actor.model_path={env.policy}",
        f"trainer.total_training_steps={STEPS}",
        "trainer.checkpoint.save_freq=2",
        "trainer.checkpoint.keep_last=2",
        "trainer.test_freq=-1",
        "trainer.val_before_train=false",
        "trainer.logger=[jsonl]",
        # Carry surplus groups over, so the buffer holds groups at the checkpoint.
        "algorithm.filter_groups.max_carry_age=2",
        # Truncated importance sampling on: its weights must resume exactly too.
        "algorithm.rollout_is.enable=true",
        *extra,
    ]


def test_sigkill_mid_step_then_resume_matches_uninterrupted_run(tiny_env, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = run(train_args(straight, *_overrides(tiny_env)), log=tmp_path / "straight.log")
    assert proc.returncode == 0, proc.stdout[-5000:]

    def step2_committed() -> bool:
        latest = killed / "checkpoints" / "latest"
        return latest.exists() and latest.read_text().strip() == "step_00000002"

    # `latest` is written last, after step 2's metrics: killing now lands in step 3
    # (generation or update), after the checkpoint, before the next one.
    run_until(train_args(killed, *_overrides(tiny_env)), log=tmp_path / "killed.log", condition=step2_committed)
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    time.sleep(3)  # nothing may still be running and writing: the kill must have been complete
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert '"step": 3,' not in (killed / "metrics.jsonl").read_text()

    proc = run(train_args(killed, *_overrides(tiny_env)), log=tmp_path / "resumed.log")
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert "step_00000002 at step 2" in proc.stdout, "the re-run did not resume from the step-2 checkpoint"

    a, b = metric_rows(straight), metric_rows(killed)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert deterministic(b[step]) == deterministic(a[step]), f"step {step} differs after resume"
    for step in range(1, STEPS + 1):  # actor and engine share weights: the IS weights stay near 1
        assert 0.9 < a[step]["rollout_is/weight_mean"] < 1.1, a[step]
    # Nothing was skipped or repeated: same prompts (scores), same carried groups, same updates.
    assert any(a[s]["dynamic_sampling/carried_in_groups"] > 0 for s in range(3, STEPS + 1)) or any(
        a[s]["dynamic_sampling/carried_groups"] > 0 for s in range(1, 3)
    ), "the buffer never carried a group: the test would not show that buffered groups survive a resume"


def test_preemption_signal_checkpoints_and_exits_cleanly(tiny_env, tmp_path):
    out, log = tmp_path / "preempted", tmp_path / "preempted.log"
    popen = start(
        train_args(out, *_overrides(tiny_env, "trainer.total_training_steps=200", "trainer.checkpoint.save_freq=-1")),
        log=log,
    )
    try:
        wait_for(
            popen,
            lambda: (out / "metrics.jsonl").exists() and '"step": 1,' in (out / "metrics.jsonl").read_text(),
            log=log,
        )
        assert signal_workers(popen, signal.SIGUSR1) == 2
        assert popen.wait(timeout=300) == 0, log.read_text()[-5000:]
    finally:
        kill_tree(popen)
    text = log.read_text()
    assert "re-run the same command to resume" in text
    latest = (out / "checkpoints" / "latest").read_text().strip()
    last_row = max(metric_rows(out))
    assert latest == f"step_{last_row:08d}" and 1 <= last_row < 200
