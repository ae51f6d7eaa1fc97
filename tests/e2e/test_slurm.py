"""The Slurm launch path on a real (local, one-node) Slurm cluster.

scripts/slurm_local.sh starts slurmctld + slurmd under a temp dir with eight fake GPU
devices, so the 32B sbatch script's GPU directives are checked by the real scheduler,
a real 2-task job runs slurm/launch.sh (dry run: planner + rendezvous), and a real job
trains the tiny model through slurm/launch.sh -> torchrun -> launch/train.py and
checkpoints. The daemons are stopped by PID at the end.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e._runs import SMALL_BATCH

ROOT = Path(__file__).resolve().parents[2]
SLURM_LOCAL = ROOT / "scripts" / "slurm_local.sh"
SBATCH_32B = ROOT / "slurm" / "dapo_32b_h800.sbatch"
NOT_INSTALLABLE = 3  # slurm_local.sh: Slurm missing and no root/apt-get to install it


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> dict[str, str]:
    """Environment (SLURM_CONF) of a fresh local cluster; stopped by PID afterwards."""
    state = tmp_path_factory.mktemp("slurm")
    proc = subprocess.run(["bash", str(SLURM_LOCAL), "start", str(state)], capture_output=True, text=True, timeout=300)
    if proc.returncode == NOT_INSTALLABLE:
        pytest.skip(f"Slurm is not installed and cannot be installed here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    env = dict(os.environ, SLURM_CONF=str(state / "etc" / "slurm.conf"))
    try:
        yield env
    finally:
        stop = subprocess.run(["bash", str(SLURM_LOCAL), "stop", str(state)], capture_output=True, text=True)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        for name in ("slurmctld", "slurmd"):
            assert not (state / f"{name}.pid").exists(), f"{name} was not stopped"


def sbatch(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sbatch", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def wait_for_job(env: dict[str, str], job_id: str, timeout: float = 120.0) -> tuple[str, str]:
    """Poll `scontrol show job` every 0.5 s (sbatch --wait polls at 2/10/42/32 s); (state, exit code)."""
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(
            ["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True, timeout=30
        ).stdout
        state = re.search(r"JobState=(\w+)", out)
        if state and state.group(1) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state.group(1), re.search(r"ExitCode=(\d+:\d+)", out).group(1)
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} did not finish in {timeout}s:\n{out}")
        time.sleep(0.5)


@pytest.mark.e2e
def test_32b_sbatch_directives_against_the_scheduler(slurm):
    # as written: 16 nodes x 8 GPUs cannot be placed on this one-node cluster
    proc = sbatch(slurm, "--test-only", str(SBATCH_32B))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Requested node configuration is not available" in proc.stderr
    # the same script with a one-node override is accepted (8 fake GPUs, exclusive, requeue, signal)
    proc = sbatch(slurm, "--test-only", "--nodes=1", str(SBATCH_32B))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "to start at" in proc.stderr
    proc = sbatch(slurm, "--test-only", "--nodes=1", "--gpus-per-node=9", str(SBATCH_32B))
    assert proc.returncode == 1, proc.stdout + proc.stderr


@pytest.mark.e2e
def test_launcher_runs_the_planner_per_task_and_refuses_infeasible_jobs(slurm, tmp_path):
    env = dict(
        slurm,
        PYTHON=sys.executable,
        GPUS_PER_NODE="2",
        GPU_MEMORY_GB="16",
        MODEL_CONFIG=str(ROOT / "configs" / "models" / "tiny-qwen2.json"),
        RDZV_PORT="29611",
        OMP_NUM_THREADS="1",
    )
    launch = "srun bash slurm/launch.sh --dry-run --config configs/tiny_cpu.yaml"
    ok_out, bad_out = tmp_path / "ok.out", tmp_path / "bad.out"
    ok = sbatch(
        dict(env, LOG_DIR=str(tmp_path / "ok-logs")),
        "--parsable", "--nodes=1", "--ntasks=2", f"--chdir={ROOT}", f"--output={ok_out}", "--wrap", launch,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    # 0.5 GiB per GPU cannot hold the engine's reserve: the planner refuses before torchrun
    bad = sbatch(
        dict(env, LOG_DIR=str(tmp_path / "bad-logs"), GPU_MEMORY_GB="0.5"),
        "--parsable", "--nodes=1", "--ntasks=1", f"--chdir={ROOT}", f"--output={bad_out}", "--wrap", launch,
    )  # fmt: skip
    assert bad.returncode == 0, bad.stderr

    state, code = wait_for_job(slurm, ok.stdout.strip().split(";")[0])
    text = ok_out.read_text()
    assert (state, code) == ("COMPLETED", "0:0"), text
    assert text.count("verdict: FEASIBLE") == 2  # one planner per task
    assert "TP2 x PP1 x DP1" in text
    rdzv = re.findall(r"rendezvous master=(\S+) port=(\d+) nnodes=(\d+) node_rank=(\d+) nproc_per_node=(\d+)", text)
    assert rdzv == [("localhost", "29611", "1", "0", "2")] * 2
    assert text.count("--rdzv-backend c10d --rdzv-endpoint localhost:29611") == 2
    assert "launch/train.py --config configs/tiny_cpu.yaml trainer.nnodes=1 trainer.n_gpus_per_node=2" in text
    logs = sorted(p.name for p in (tmp_path / "ok-logs").iterdir())
    assert len(logs) == 2 and all(re.fullmatch(r"node0-task[01]-.+\.log", n) for n in logs), logs
    for log in (tmp_path / "ok-logs").iterdir():
        assert "verdict: FEASIBLE" in log.read_text()

    state, code = wait_for_job(slurm, bad.stdout.strip().split(";")[0])
    text = bad_out.read_text()
    assert (state, code) == ("FAILED", "1:0"), text
    assert "verdict: INFEASIBLE" in text
    assert "planner refused this job (exit 1): not starting torchrun" in text
    assert "rendezvous" not in text


@pytest.mark.e2e
def test_sbatch_trains_the_tiny_model_and_checkpoints(slurm, tiny_task, tmp_path):
    """One node, one task, torchrun with 2 ranks: the same path a 16-node job takes."""
    out_dir, job_out = tmp_path / "run", tmp_path / "job.out"
    env = dict(
        slurm,
        PYTHON=sys.executable,
        GPUS_PER_NODE="2",
        GPU_MEMORY_GB="16",
        MODEL_CONFIG=str(tiny_task.init_model / "config.json"),
        RDZV_PORT="29612",
        OMP_NUM_THREADS="1",
        LOG_DIR=str(tmp_path / "logs"),
    )
    overrides = " ".join(
        [
            *SMALL_BATCH,
            *tiny_task.data_overrides(),
            f"actor.model_path={tiny_task.init_model}",
            f"trainer.output_dir={out_dir}",
            "trainer.total_training_steps=2",
            "trainer.checkpoint.save_freq=2",
            "trainer.test_freq=-1",
            "trainer.val_before_train=false",
            "algorithm.filter_groups.enable=false",  # a random policy: no group would pass the filter
        ]
    )
    launch = f"srun bash slurm/launch.sh --config configs/tiny_cpu.yaml {overrides}"
    job = sbatch(
        env, "--parsable", "--nodes=1", "--ntasks=1", f"--chdir={ROOT}", f"--output={job_out}", "--wrap", launch
    )
    assert job.returncode == 0, job.stderr
    state, code = wait_for_job(slurm, job.stdout.strip().split(";")[0], timeout=600)
    assert (state, code) == ("COMPLETED", "0:0"), job_out.read_text()[-5000:]
    from dapo_megatron.observability.tracking import merge_rows_by_step, read_jsonl

    assert [r["step"] for r in merge_rows_by_step(read_jsonl(out_dir / "metrics.jsonl"))] == [1, 2]
    assert (out_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"


# Stands in for launch/train.py: trains until SIGUSR1, then "checkpoints" and exits 0. It takes
# the signal through the trainer's own handler, which ignores the second copy every worker
# gets here (slurmstepd signals the whole step, launch.sh forwards by PID).
FAKE_TRAINER = """
import os, sys, time
from dapo_megatron.preemption import on_stop_signal
rank = os.environ["RANK"]
got = []
on_stop_signal(got.append)
open(os.path.join(os.environ["MARKER_DIR"], "ready" + rank), "w").close()
print("rank", rank, "training", flush=True)
while not got:
    time.sleep(0.1)
print("rank", rank, "SIGUSR1: checkpoint written, exit 0", flush=True)
"""


@pytest.mark.e2e
def test_usr1_before_the_time_limit_checkpoints_and_requeues(slurm, tmp_path):
    """The 32B sbatch script (one node, tiny config) forwards USR1 to the trainer and requeues the job."""
    trainer = tmp_path / "fake_train.py"
    trainer.write_text(FAKE_TRAINER)
    out = tmp_path / "job.out"
    env = dict(
        slurm,
        CONFIG="configs/tiny_cpu.yaml",
        PYTHON=sys.executable,
        GPUS_PER_NODE="2",
        GPU_MEMORY_GB="16",
        MODEL_CONFIG=str(ROOT / "configs" / "models" / "tiny-qwen2.json"),
        OUTPUT_DIR=str(tmp_path / "run"),
        LOG_DIR=str(tmp_path / "logs"),
        TRAIN_SCRIPT=str(trainer),
        MARKER_DIR=str(tmp_path),
        RDZV_PORT="29612",
        OMP_NUM_THREADS="1",
    )
    proc = sbatch(env, "--parsable", "--nodes=1", f"--output={out}", str(SBATCH_32B))
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{r}").exists() for r in (0, 1)):
        assert time.monotonic() < deadline, out.read_text() if out.exists() else "no output"
        time.sleep(0.5)
    # what Slurm does 300 s before the time limit (--signal=B:USR1@300): signal the batch shell
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True, timeout=30)
    try:
        while True:
            info = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
            if re.search(r"Restarts=1\b", info) and re.search(r"JobState=(PENDING|REQUEUED)", info):
                break
            assert "JobState=FAILED" not in info and "JobState=COMPLETED" not in info, info + out.read_text()
            assert time.monotonic() < deadline, info
            time.sleep(0.5)
    finally:
        subprocess.run(["scancel", job], env=env, timeout=30)  # the resumed run is the trainer's test
    text = out.read_text()
    assert "forwarding SIGUSR1" in text, text
    assert re.search(r"launch.sh: SIGUSR1 -> training processes \d+ \d+", text), text
    for rank in (0, 1):
        assert f"rank {rank} SIGUSR1: checkpoint written, exit 0" in text, text
    assert "launch.sh: torchrun exited with 0" in text, text
    assert f"requeueing job {job} to resume" in text, text


@pytest.mark.e2e
def test_planner_cli_on_the_32b_recipe():
    model = str(ROOT / "configs" / "models" / "qwen2.5-32b.json")
    base = [sys.executable, "-m", "dapo_megatron.plan", "--config", "configs/dapo_qwen2.5_32b.yaml"]
    base += ["--model-config", model, "--gpus-per-node", "8"]
    fits = subprocess.Popen(
        [*base, "--nodes", "16", "--gpu-memory-gb", "80"], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    small = subprocess.run([*base, "--nodes", "1", "--gpu-memory-gb", "24"], cwd=ROOT, capture_output=True, text=True)
    out, _ = fits.communicate(timeout=120)
    assert fits.returncode == 0, out
    assert "verdict: FEASIBLE" in out
    assert small.returncode == 1, small.stdout + small.stderr
    assert "verdict: INFEASIBLE" in small.stdout and "suggestion:" in small.stdout
    # the sbatch's USR1 lead covers the planner's step estimate plus the save (10 min, see its header)
    step_min = float(re.search(r"^  step\s+~([\d.]+) min", out, re.M).group(1))
    lead_s = int(re.search(r"^#SBATCH --signal=B:USR1@(\d+)$", SBATCH_32B.read_text(), re.M).group(1))
    assert lead_s >= (step_min + 10) * 60, (lead_s, step_min)
