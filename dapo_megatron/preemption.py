"""Pre-emption signals: the request to checkpoint and exit cleanly.

SIGUSR1 comes from the sbatch script before the time limit, SIGTERM from `scancel` or
torchrun. On a Slurm node a worker usually gets the same signal twice: once straight from
slurmstepd (it signals every process of the step) and once from slurm/launch.sh, which
forwards it by PID. Python resets a handled signal to its default action while the
interpreter shuts down, and the default action of both is to terminate. A repeat that lands
in that window kills the process that has just checkpointed, and torchrun reports the job as
failed. So after the first request both signals are ignored: the checkpoint is already
coming, and an ignored signal stays ignored through shut-down.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def on_stop_signal(callback: Callable[[int], None]) -> None:
    """Call `callback(signum)` on the first SIGTERM or SIGUSR1; ignore both from then on."""

    def handle(signum: int, frame) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        callback(signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, handle)
