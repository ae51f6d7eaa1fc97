"""A repeated pre-emption signal must not kill a worker that is exiting after its checkpoint.

On Slurm a worker gets SIGUSR1 from slurmstepd and again from slurm/launch.sh. The second
one can land while the interpreter shuts down, where Python has already put the default
action (terminate) back. These tests send SIGUSR1 every 0.2 ms from the first one until the
child is gone, so the shut-down window is always hit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import signal, sys, time
sys.path.insert(0, {root!r})
from dapo_megatron.preemption import on_stop_signal
got = []
if {plain}:
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: got.append(signum))
else:
    on_stop_signal(got.append)
print("ready", flush=True)
while not got:
    time.sleep(0.01)
print("stop", got[0], flush=True)
"""


def _exit_under_repeated_usr1(plain: bool) -> tuple[int, str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(root=str(ROOT), plain=plain)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 30
    while proc.poll() is None:
        assert time.monotonic() < deadline, "the child did not exit after SIGUSR1"
        try:
            os.kill(proc.pid, signal.SIGUSR1)
        except ProcessLookupError:
            break
        time.sleep(0.0002)
    rest = proc.stdout.read()
    return proc.wait(), rest


def test_a_repeated_stop_signal_during_exit_does_not_kill_the_worker():
    for _ in range(3):
        rc, out = _exit_under_repeated_usr1(plain=False)
        assert rc == 0, f"exit status {rc}"
        assert out.strip() == f"stop {int(signal.SIGUSR1)}"


def test_a_plain_python_handler_is_killed_by_the_repeat():
    """Why on_stop_signal ignores repeats: the window is real in this Python."""
    codes = [_exit_under_repeated_usr1(plain=True)[0] for _ in range(3)]
    assert -signal.SIGUSR1 in codes, codes


def test_after_the_first_request_both_stop_signals_are_ignored():
    from dapo_megatron.preemption import STOP_SIGNALS, on_stop_signal

    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    got: list[int] = []
    try:
        on_stop_signal(got.append)
        os.kill(os.getpid(), signal.SIGTERM)
        assert got == [signal.SIGTERM]
        assert all(signal.getsignal(sig) is signal.SIG_IGN for sig in STOP_SIGNALS)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
