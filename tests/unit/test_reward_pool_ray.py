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

from dapo_megatron.reward import ray_executor  # noqa: E402
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


SLOW_S = 4.0


def ray_slow_scorer(response: str, truth: str) -> dict:
    if response == "hang":
        while True:
            pass
    if response.startswith("slow "):
        time.sleep(SLOW_S)
        response = response.removeprefix("slow ")
    return compute_score(response, truth)


@ray.remote(num_cpus=1)
class CpuHog:
    """Holds one of the cluster's CPUs, as another job on a loaded node would."""

    def ready(self) -> bool:
        return True


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
    with RewardPool(scorer=ray_chaos_scorer, executor="ray", num_workers=2, timeout_s=5.0) as pool:
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


@pytest.mark.timeout(180)
def test_timeout_clock_starts_when_the_task_starts(local_ray: None) -> None:
    # One free CPU for two tasks in flight: each slow answer runs for 2/3 of the
    # timeout, so the second one, queued behind the first, finishes 4/3 of the
    # timeout after its submission but only 2/3 after its start.
    hog = CpuHog.remote()
    ray.get(hog.ready.remote(), timeout=60)
    try:
        with RewardPool(scorer=ray_slow_scorer, executor="ray", num_workers=2, timeout_s=1.5 * SLOW_S) as pool:
            batch = pool.score(["slow Answer: 1", "slow Answer: 2", "Answer: 3"], ["1", "2", "4"])
            assert batch.failed == [None, None, None]
            assert batch.acc == [True, True, False]
            assert pool.metrics()["reward/num_timeouts"] == 0

            # A task that does run past the timeout is still cancelled and counted.
            batch = pool.score(["slow Answer: 1", "hang", "Answer: 3"], ["1", "x", "3"])
            assert batch.failed == [None, "timeout", None]
            assert batch.acc == [True, False, True]
            metrics = pool.metrics()
            assert metrics["reward/num_timeouts"] == 1 and metrics["reward/num_worker_restarts"] == 1
    finally:
        ray.kill(hog)


@pytest.mark.timeout(120)
def test_task_that_never_starts_fails_as_startup_error(local_ray: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_executor, "STARTUP_TIMEOUT_S", 3.0)
    with RewardPool(scorer=ray_slow_scorer, executor="ray", num_workers=1, timeout_s=60.0) as pool:
        hogs = [CpuHog.remote() for _ in range(2)]
        try:
            ray.get([h.ready.remote() for h in hogs], timeout=60)
            batch = pool.score(["Answer: 1"], ["1"])
        finally:
            for h in hogs:
                ray.kill(h)
        assert batch.failed == ["error: startup: no Ray worker after 3 s"]
        assert pool.metrics()["reward/num_worker_restarts"] == 1
        # the cluster's CPUs are free again: the next batch scores normally
        monkeypatch.undo()
        assert pool.score(["Answer: 1"], ["1"]).failed == [None]
