"""A run killed with SIGKILL mid-step and resumed repeats the uninterrupted run exactly; damaged
checkpoints, a full disk and changed settings on resume are handled and named."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from dapo_megatron.checkpoint.verify import verify_checkpoint
from tests.e2e._runs import (
    deterministic,
    kill_tree,
    metric_rows,
    package_tracebacks,
    run,
    run_until,
    signal_workers,
    start,
    train_args,
    wait_for,
)

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


@pytest.fixture(scope="module")
def straight(tiny_env, tmp_path_factory) -> Path:
    """The uninterrupted run: checkpoints at steps 2, 4 and 5, of which keep_last=2 keeps 4 and 5."""
    root = tmp_path_factory.mktemp("straight")
    proc = run(train_args(root / "run", *_overrides(tiny_env)), log=root / "straight.log")
    assert proc.returncode == 0, proc.stdout[-5000:]
    return root / "run"


def test_sigkill_mid_step_then_resume_matches_uninterrupted_run(tiny_env, straight, tmp_path):
    killed = tmp_path / "killed"

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


def _fill_once_exists(trigger: Path, disk: Path, stop: threading.Event) -> threading.Thread:
    """Fill ``disk`` to the last byte as soon as ``trigger`` appears (a save has begun)."""

    def fill() -> None:
        while not trigger.exists():
            if stop.wait(0.002):
                return
        with open(disk / "filler", "wb") as f:
            os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(disk).free)

    thread = threading.Thread(target=fill, daemon=True)
    thread.start()
    return thread


def test_damaged_checkpoints_full_disk_and_changed_settings(tiny_env, straight, tmp_path, mount_tmpfs):
    """The straight run's checkpoints, copied onto a 64 MiB tmpfs:

    1. a flipped byte in step 5 (same size): naming step 5 is refused at start-up, found by the
       checksums, printed once without a traceback; nothing is touched;
    2. the same shard truncated: resume=auto skips step 5 (renamed, not deleted) for step 4 and
       lists the changed settings; step 5's save then meets a full disk (filled as the save
       begins): every rank stops with the path and the free space, `latest` stays on step 4.
    """
    disk = mount_tmpfs(64 * 1024)
    out, log = disk / "run", tmp_path / "run.log"
    shutil.copytree(straight, out)
    ckpts = out / "checkpoints"
    step4, step5 = ckpts / "step_00000004", ckpts / "step_00000005"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", step4.name, step5.name]
    shard = step5 / "__1_0.distcp"
    size = shard.stat().st_size
    data = bytearray(shard.read_bytes())
    data[size // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    proc = run(train_args(out, *_overrides(tiny_env, f"trainer.checkpoint.resume={step5}")), log=log, timeout=300)
    assert proc.returncode != 0
    refused = (
        f"error: CheckpointIntegrityError: checkpoint {step5} is damaged (sizes and crc32 checked against its "
        f"manifest.json): __1_0.distcp: expected crc32 0x"
    )
    assert proc.stdout.count(refused) == 1, proc.stdout[-5000:]
    assert "It is named by trainer.checkpoint.resume, so it is not replaced by another one" in proc.stdout
    assert not package_tracebacks(proc.stdout), proc.stdout[-5000:]
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", step4.name, step5.name]

    with open(shard, "r+b") as f:
        f.truncate(size // 3)
    stop = threading.Event()
    filler = _fill_once_exists(ckpts / "tmp-step_00000005", disk, stop)
    try:
        changed = ("rollout.n=4", "data.train_batch_size=4", "actor.optim.lr=1e-4")
        proc = run(train_args(out, *_overrides(tiny_env, *changed)), log=log, timeout=400)
    finally:
        stop.set()
        filler.join(timeout=60)
    text = proc.stdout
    assert proc.returncode != 0, text[-5000:]
    assert (
        f"CHECKPOINT SKIPPED: {step5} is damaged (__1_0.distcp: expected {size} bytes, found {size // 3} bytes); "
        "renamed to damaged-step_00000005; resume=auto falls back to step_00000004"
    ) in text, text[-5000:]
    assert "rollout.n: 8 -> 4" in text and "data.train_batch_size: 8 -> 4" in text, text[-5000:]
    assert "(allowed): actor.optim.lr: 0.0002 -> 0.0001" in text, text[-5000:]
    assert "step_00000004 at step 4" in text
    failed = f"saving checkpoint step_00000005 into {ckpts / 'tmp-step_00000005'} failed (rank 0: [Errno 28]"
    assert failed in text, text[-5000:]
    assert f"B free on the file system of {ckpts} when it failed; `latest` still names step_00000004" in text
    # nothing good deleted, the damaged checkpoint kept for inspection, no partial left behind
    assert sorted(p.name for p in ckpts.iterdir()) == ["damaged-step_00000005", "latest", step4.name]
    assert (ckpts / "latest").read_text().strip() == step4.name
    assert verify_checkpoint(step4, checksums=True).intact
    assert (ckpts / "damaged-step_00000005" / shard.name).stat().st_size == size // 3
