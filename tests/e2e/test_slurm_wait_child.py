"""slurm/wait_child.sh: the exit status that launch.sh and the sbatch script report.

Both scripts trap SIGUSR1 while they wait for a child (torchrun, srun). A trapped signal
makes `wait` return 128+10 at once; if the child exits while the handler runs, bash reaps
it inside the handler. A loop that stopped as soon as `kill -0` failed then reported 138
instead of the child's status: under load on CI, launch.sh exited 138 after a clean
checkpoint, srun killed the step (--kill-on-bad-exit) and the requeue test failed.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

WAIT_CHILD = Path(__file__).resolve().parents[2] / "slurm" / "wait_child.sh"


def run_bash(script: str) -> str:
    proc = subprocess.run(
        ["bash", "-c", f"set -euo pipefail\nsource {WAIT_CHILD}\n{script}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.strip()


@pytest.mark.parametrize("status", [0, 3])
def test_child_status_without_signals(status):
    assert run_bash(f"( sleep 0.2; exit {status} ) & wait_child $!; echo $WAIT_RC") == str(status)


def test_child_that_exits_while_the_trap_handler_runs_reports_its_own_status():
    # The handler outlives the child: bash reaps the child inside it, so `kill -0` fails
    # right after the interrupted `wait` (which said 138).
    out = run_bash(
        """
        handler() { sleep 1; }
        trap handler USR1
        ( sleep 0.3; exit 7 ) &
        child=$!
        ( sleep 0.1; kill -USR1 $$ ) &
        wait_child "$child"
        echo "$WAIT_RC"
        """
    )
    assert out == "7"


def test_signals_while_the_child_runs_do_not_end_the_wait():
    out = run_bash(
        """
        hits=0
        handler() { hits=$((hits + 1)); }
        trap handler USR1
        ( sleep 1.5; exit 5 ) &
        child=$!
        ( for _ in 1 2 3; do sleep 0.2; kill -USR1 $$; done ) &
        wait_child "$child"
        echo "$WAIT_RC $hits"
        """
    )
    assert out == "5 3"


def test_a_child_killed_by_a_signal_reports_128_plus_the_signal():
    assert run_bash("( kill -KILL $BASHPID ) & wait_child $!; echo $WAIT_RC") == "137"


def test_a_handler_that_assigns_pid_does_not_redirect_the_wait():
    # launch.sh's forward_usr1 loops `for pid in $pids` and runs inside wait_child.
    out = run_bash(
        """
        handler() { for pid in 1 2; do :; done; }
        trap handler USR1
        ( sleep 0.6; exit 4 ) &
        child=$!
        ( sleep 0.1; kill -USR1 $$ ) &
        wait_child "$child"
        echo "$WAIT_RC"
        """
    )
    assert out == "4"
