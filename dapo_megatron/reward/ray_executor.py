"""Ray backend of the reward pool, for a cluster-wide pool of verifiers.

Kept apart from the process pool because Ray is optional: nothing here is
imported unless ``executor="ray"`` is chosen.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from dapo_megatron.compat.ray_local import LOCAL_ONLY_ENV, force_local_only
from dapo_megatron.reward.pool import (
    STARTUP_TIMEOUT_S,
    Context,
    Scorer,
    _complete,
    _describe,
    _Executor,
    _failed,
    _Item,
    _Outcome,
    _score_one,
)


def ensure_ray(num_cpus: int | None = None) -> bool:
    """Connect to Ray; return True when this call started a new local instance.

    With ``RAY_ADDRESS`` set, joins that cluster. Otherwise starts a
    single-node Ray whose every server listens on 127.0.0.1 only: Ray rewrites
    a loopback node address to the machine's public one unless its
    Windows/macOS "local only" mode is forced, which needs
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` before ``ray`` is imported (and the
    module constant patched if it already was: :mod:`dapo_megatron.compat.ray_local`).
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = os.environ.get("RAY_ADDRESS")
    local_only_var = LOCAL_ONLY_ENV
    saved = os.environ.get(local_only_var)
    if not address:
        os.environ[local_only_var] = "0"
    try:
        import ray  # optional dependency: the [ray] extra, for executor='ray' only
    except ImportError as exc:
        raise ImportError(
            "executor='ray' needs the ray package: pip install 'ray>=2.40' (or the project's [ray] extra)"
        ) from exc
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address)
        return False
    force_local_only()
    try:
        # The raylet, GCS and agents inherit the variable now; later processes
        # of this program (e.g. a user's own `ray start`) should not.
        context = ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
        )
    finally:
        if saved is None:
            os.environ.pop(local_only_var, None)
        else:
            os.environ[local_only_var] = saved
    node_ip = context.address_info.get("node_ip_address")
    if node_ip != "127.0.0.1":
        ray.shutdown()
        raise RuntimeError(f"local Ray bound {node_ip!r} instead of 127.0.0.1; refusing to run")
    return True


# first item of every scoring task: the scorer is about to run
_STARTED = None


class RayExecutor(_Executor):
    def __init__(self, scorer: Scorer, num_workers: int, timeout_s: float) -> None:
        self._owns_ray = ensure_ray(num_cpus=num_workers)
        import ray  # optional dependency: present once ensure_ray() has returned

        self._ray = ray
        self._num_workers = num_workers
        self._timeout_s = timeout_s
        self._restarts = 0
        self._scorer_ref = ray.put(scorer)
        # Streaming, so that the task's first item (the start signal) reaches
        # the driver while the scorer is still running.
        self._task = ray.remote(num_cpus=1, max_retries=0, num_returns="streaming")(_ray_score_one)
        # Start (and warm) the Ray workers now: the first batch then does not
        # wait for them, and a scorer that cannot load fails here.
        warm = ray.remote(num_cpus=1, max_retries=0)(_ray_warmup)
        ray.get([warm.remote(self._scorer_ref) for _ in range(num_workers)], timeout=STARTUP_TIMEOUT_S)

    def pop_restarts(self) -> int:
        n, self._restarts = self._restarts, 0
        return n

    def run(self, items: list[_Item]) -> list[_Outcome]:
        ray = self._ray
        results: list[_Outcome | None] = [None] * len(items)
        pending = deque(range(len(items)))
        inflight: dict[Any, _Inflight] = {}
        try:
            while pending or inflight:
                while pending and len(inflight) < self._num_workers:
                    index = pending.popleft()
                    task = self._task.remote(self._scorer_ref, *items[index])
                    inflight[task] = _Inflight(index, time.monotonic() + STARTUP_TIMEOUT_S)
                nearest = min(t.deadline for t in inflight.values())
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=max(0.0, nearest - time.monotonic()))
                if ready:
                    ready, _ = ray.wait(list(inflight), num_returns=len(inflight), timeout=0)
                for task in ready:
                    try:
                        item = ray.get(next(task))
                    except StopIteration:
                        item = _failed("error: RuntimeError: Ray task ended without a result")
                    except ray.exceptions.RayError as exc:  # worker crash, OOM kill, ...
                        item = _failed("error: " + _describe(exc))
                        if isinstance(exc, ray.exceptions.WorkerCrashedError):
                            self._restarts += 1
                    if item is _STARTED:
                        inflight[task].start(self._timeout_s)
                    else:
                        results[inflight.pop(task).index] = item
                now = time.monotonic()
                for task, t in list(inflight.items()):
                    if now >= t.deadline:
                        ray.cancel(task, force=True)
                        del inflight[task]
                        waited = f"error: startup: no Ray worker after {STARTUP_TIMEOUT_S:.0f} s"
                        results[t.index] = _failed("timeout" if t.started else waited)
                        self._restarts += 1
        except BaseException:
            for task in inflight:
                ray.cancel(task, force=True)
            raise
        return _complete(results)

    def close(self) -> None:
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()


class _Inflight:
    """A submitted task; its deadline bounds the wait for a worker until the start signal, then the scoring."""

    __slots__ = ("deadline", "index", "started")

    def __init__(self, index: int, deadline: float) -> None:
        self.index = index
        self.deadline = deadline
        self.started = False

    def start(self, timeout_s: float) -> None:
        self.deadline = time.monotonic() + timeout_s
        self.started = True


def _ray_warmup(scorer: Scorer) -> None:
    warmup = getattr(scorer, "warmup", None)
    if callable(warmup):
        warmup()


def _ray_score_one(scorer: Scorer, response: str, ground_truth: str, context: Context = None) -> Iterator[Any]:
    """Signal the start, then yield the result: the timeout clock starts at the signal.

    Time spent queued for a worker or starting one (e.g. after a forced
    cancel) thus does not count against the response, as in the process pool.
    """
    # Ray may route a task to a fresh worker (e.g. after a forced cancel).
    _ray_warmup(scorer)
    yield _STARTED
    yield _score_one(scorer, response, ground_truth, context)
