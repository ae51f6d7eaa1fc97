"""Helpers for end-to-end runs of launch/train.py under torchrun, in their own process group."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from dapo_megatron.observability.tracking import merge_rows_by_step, read_jsonl
from tests.dist._launch import child_env

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny_cpu.yaml"
# Seconds and machine-dependent quantities: everything else must repeat exactly.
NONDETERMINISTIC_PREFIXES = ("timing_s/", "perf/", "weight_sync/seconds", "weight_sync/gbps")


def torchrun_cmd(args: list[str], nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]


def run(
    args: list[str], *, log: Path, timeout: float = 600, nproc: int = 2, threads: int = 1
) -> subprocess.CompletedProcess:
    """Run to completion with ``threads`` per process; the combined output goes to ``log`` and
    is returned."""
    with open(log, "w") as f:
        proc = subprocess.run(
            torchrun_cmd(args, nproc),
            cwd=ROOT,
            env=child_env(OMP_NUM_THREADS=str(threads)),
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            start_new_session=True,
        )
    return subprocess.CompletedProcess(proc.args, proc.returncode, log.read_text(), "")


def start(args: list[str], *, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(
            torchrun_cmd(args), cwd=ROOT, env=child_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_for(popen: subprocess.Popen, condition: Callable[[], bool], *, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if popen.poll() is not None:
            raise AssertionError(f"run ended (rc={popen.returncode}) before the awaited point:\n{log.read_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"awaited point not reached in {timeout}s:\n{log.read_text()[-5000:]}")
        time.sleep(0.05)


def run_until(args: list[str], *, log: Path, condition: Callable[[], bool], timeout: float = 600) -> None:
    """Start a run and SIGKILL it and all its processes as soon as ``condition()`` holds."""
    popen = start(args, log=log)
    try:
        wait_for(popen, condition, log=log, timeout=timeout)
    finally:
        kill_tree(popen)


def signal_workers(popen: subprocess.Popen, signum: int) -> int:
    """Send ``signum`` to the training processes (not torchrun), as Slurm's --signal does."""
    import psutil

    workers = [p for p in psutil.Process(popen.pid).children(recursive=True) if "train.py" in " ".join(p.cmdline())]
    for p in workers:
        p.send_signal(signum)
    return len(workers)


def kill_tree(popen: subprocess.Popen) -> None:
    """SIGKILL torchrun and every descendant: torchrun's workers may leave its process group."""
    import psutil

    try:
        procs = [psutil.Process(popen.pid), *psutil.Process(popen.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    popen.wait()


# The tests' runs check behaviour, not learning: a quarter of the demo's batch keeps them quick.
SMALL_BATCH = ("data.gen_batch_size=16", "data.train_batch_size=8", "actor.ppo_mini_batch_size=4")


def train_args(out: Path, *overrides: str) -> list[str]:
    return [
        str(ROOT / "launch" / "train.py"),
        "--config",
        str(TINY),
        f"trainer.output_dir={out}",
        *SMALL_BATCH,
        *overrides,
    ]


def metric_rows(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in merge_rows_by_step(read_jsonl(out / "metrics.jsonl"))}


def package_tracebacks(text: str) -> list[str]:
    """Traceback lines that point into this package (torchrun's own report has none)."""
    return [line for line in text.splitlines() if 'File "' in line and "dapo_megatron" in line]


def deterministic(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(NONDETERMINISTIC_PREFIXES)}
