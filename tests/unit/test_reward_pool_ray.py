"""RewardPool on Ray: a loopback-only local cluster, timeouts by forced cancel."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

# Before ray is imported: no usage reporting, no token file written to ~/.ray.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
import psutil  # noqa: E402
import ray  # noqa: E402

from dapo_megatron.reward.math_dapo import compute_score  # noqa: E402
from dapo_megatron.reward.pool import RewardPool  # noqa: E402
from dapo_megatron.reward.ray_executor import ensure_ray  # noqa: E402

pytestmark = pytest.mark.ray

# Ray workers import only the driver's cwd and script directory; ship this
# module's scorer by value instead of requiring tests/unit on their path.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def ray_chaos_scorer(response: str, truth: str) -> dict:
    if response == "hang":
        while True:
            pass
    if response == "raise":
        raise ValueError("boom")
    if response == "exit":
        os._exit(3)
    if response == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    return compute_score(response, truth)


@pytest.fixture(scope="module")
def local_ray():
    saved = os.environ.pop("RAY_ADDRESS", None)
    if ray.is_initialized():
        ray.shutdown()
    assert ensure_ray(num_cpus=2) is True
    try:
        yield
    finally:
        ray.shutdown()
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved


def _listening_addresses() -> set[tuple[str, int, str]]:
    me = psutil.Process()
    found = set()
    for proc in [me, *me.children(recursive=True)]:
        try:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((conn.laddr.ip, conn.laddr.port, proc.name()))
        except psutil.Error:
            continue
    return found


@pytest.mark.timeout(120)
def test_local_ray_listens_on_loopback_only(local_ray: None) -> None:
    assert ensure_ray(num_cpus=2) is False  # already connected: reused, not restarted
    node_ips = {node["NodeManagerAddress"] for node in ray.nodes()}
    assert node_ips == {"127.0.0.1"}
    listening = _listening_addresses()
    assert any(name in ("gcs_server", "raylet") for _, _, name in listening), listening
    exposed = sorted(x for x in listening if x[0] not in LOOPBACK)
    assert not exposed, f"Ray listens beyond loopback: {exposed}"


@pytest.mark.timeout(240)
def test_scores_and_survives_hangs_errors_and_crashes(local_ray: None) -> None:
    # Ray's timeout clock starts at submission, and a task queued after a forced cancel or
    # a crash waits for a fresh Ray worker: ~1 s on a quiet machine, but over 8 s at a load
    # average of 10, where the good answers queued behind them then read as timeouts.
    with RewardPool(scorer=ray_chaos_scorer, executor="ray", num_workers=2, timeout_s=20.0) as pool:
        responses = ["Answer: 1", "hang", "raise", "exit", "segv", "Answer: 2", "Answer: 5"]
        truths = ["1", "x", "x", "x", "x", "2", "4"]
        start = time.monotonic()
        batch = pool.score(responses, truths)
        assert time.monotonic() - start < 120
        assert batch.acc == [True, False, False, False, False, True, False]
        assert batch.scores == [1.0, -1.0, -1.0, -1.0, -1.0, 1.0, -1.0]
        assert batch.failed[0] is None and batch.failed[5] is None and batch.failed[6] is None
        assert batch.failed[1] == "timeout" and batch.preds[1] == "[TIMEOUT]"
        assert batch.failed[2] == "error: ValueError: boom"
        assert batch.failed[3].startswith("error: WorkerCrashedError")
        assert batch.failed[4].startswith("error: WorkerCrashedError")
        metrics = pool.metrics()
        assert metrics["reward/num_timeouts"] == 1
        assert metrics["reward/num_errors"] == 3
        assert metrics["reward/num_scored"] == 7

        again = pool.score(["Answer: 7"] * 4, ["7"] * 4)
        assert again.acc == [True] * 4 and again.failed == [None] * 4
    # The pool did not start Ray, so closing it leaves the cluster up.
    assert ray.is_initialized()


@pytest.mark.timeout(60)
def test_builtin_backend_on_ray(local_ray: None) -> None:
    with RewardPool("math_dapo", executor="ray", num_workers=2, strict_box_verify=True) as pool:
        assert pool.score(["\\boxed{4}", "Answer: 4"], ["4", "4"]).acc == [True, False]
