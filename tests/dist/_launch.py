"""Run a python script under ``torchrun`` for distributed (gloo) tests."""

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
    run_env = dict(os.environ)
    run_env.update(
        OMP_NUM_THREADS="1",
        PYTHONPATH=repo_pythonpath(),
        PYTHONWARNINGS="ignore",
        TOKENIZERS_PARALLELISM="false",
    )
    if env:
        run_env.update(env)
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
