"""Run a python script under ``torchrun`` (or alone) for distributed (gloo) tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKERS = Path(__file__).resolve().parent / "workers"


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def repo_pythonpath() -> str:
    """The repository root in front of the caller's PYTHONPATH.

    Kept, not replaced: a test run with another megatron-core in front
    (``PYTHONPATH=/tmp/mc19``) must reach its child processes too.
    """
    return os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))


# Set by torchrun; a child that is not launched by it must not see a parent's.
_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a test's child python: one thread, the repository root on PYTHONPATH
    (so workers import ``dapo_megatron`` and ``tests.*``), no warnings, no torchrun variables."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONPATH=repo_pythonpath(),
        PYTHONWARNINGS="ignore",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra)
    return env


def run_python(argv: list | tuple, *, timeout: float = 300.0, expect_rc: int | None = 0) -> subprocess.CompletedProcess:
    """Run ``python *argv`` (a script path or ``-m module``) in one process, from the repository
    root with :func:`child_env`.  Raises AssertionError with the output when the exit status is not
    ``expect_rc`` (``None``: any)."""
    proc = subprocess.run(
        [sys.executable, *map(str, argv)],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if expect_rc is not None and proc.returncode != expect_rc:
        raise AssertionError(
            f"rc={proc.returncode} (expected {expect_rc}): {' '.join(proc.args)}\n"
            f"--- stdout ---\n{proc.stdout[-5000:]}\n--- stderr ---\n{proc.stderr[-20000:]}"
        )
    return proc


def run_torchrun(
    script: str | os.PathLike,
    args: list[str] | tuple[str, ...] = (),
    *,
    nproc: int = 2,
    timeout: float = 180.0,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``torchrun --nproc_per_node=nproc script *args`` and return the finished process.

    Each rank gets ``OMP_NUM_THREADS=1``; the repository root is put on PYTHONPATH.
    Raises AssertionError with the full stdout/stderr when the job fails or times out.
    """
    script = Path(script)
    if not script.is_absolute():
        script = WORKERS / script
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--nnodes=1",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        str(script),
        *map(str, args),
    ]
    run_env = child_env(**(env or {}))
    # own session so a timeout can stop torchrun *and* its ranks (our process group only)
    popen = subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        env=run_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(popen.pid, signal.SIGKILL)
        out, err = popen.communicate()
        raise AssertionError(
            f"torchrun timed out after {timeout}s: {' '.join(cmd)}\n"
            f"--- stdout ---\n{out[-20000:]}\n--- stderr ---\n{err[-20000:]}"
        ) from None
    proc = subprocess.CompletedProcess(cmd, popen.returncode, out, err)
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun failed (rc={proc.returncode}): {' '.join(cmd)}\n"
            f"--- stdout ---\n{proc.stdout[-20000:]}\n--- stderr ---\n{proc.stderr[-20000:]}"
        )
    return proc
