"""Parallel reward scoring that survives hanging, raising and crashing verifiers.

Why this shape:

* Persistent workers: start-up (interpreter, imports, sympy for math-verify)
  is paid once per pool, not per training step. Each worker reports "ready"
  after warming its scorer up, and a response's timeout clock starts only when
  a ready worker receives it, so cold starts never count as timeouts.
* One response in flight per worker: the per-response timeout is then exact
  and a hang is attributed to exactly one response. The pipe round trip
  (~50 us) is small next to a verifier call.
* Timeouts are enforced from the caller's side by SIGKILL: a verifier stuck in
  C code (regex, sympy) cannot be interrupted from inside, and signals only
  reach a Python main thread. The killed worker is replaced at once; the
  response scores as incorrect ("[TIMEOUT]"), and the batch carries on.
* "forkserver" start method: the trainer process holds CUDA/gloo state and
  many threads, which ``fork`` would copy half-initialised. The fork server is
  a fresh interpreter, and replacing a worker forks from it cheaply.
* Ray (optional) for a cluster-wide pool: streaming tasks with
  ``max_retries=0`` whose first item signals the start (the clock starts
  there, as with processes), a window of ``num_workers`` tasks in flight,
  ``ray.wait`` against the nearest deadline and ``ray.cancel(force=True)``
  for hung ones.

Failures never raise from :meth:`RewardPool.score`; they are returned per
response in ``ScoredBatch.failed`` and counted in :meth:`RewardPool.metrics`.
Configuration mistakes (bad arguments, a scorer that cannot be pickled, workers
that cannot even start) do raise, because retrying cannot fix them.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import math
import multiprocessing as mp
import os
import pickle
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Self

from dapo_megatron.contract import ScoredBatch
from dapo_megatron.reward import BACKENDS, EXECUTORS, get_scorer

logger = logging.getLogger(__name__)

Scorer = Callable[..., Mapping[str, Any]]
# (data source, extra info) of one response, or None when the caller has none
Context = tuple[str, dict[str, object]] | None
_Item = tuple[str, str, Context]
FAILED_SCORE = -1.0
TIMEOUT_PRED = "[TIMEOUT]"
ERROR_PRED = "[ERROR]"
# Generous: the first worker also starts the fork server, which imports the
# caller's __main__ module (possibly torch) once.
STARTUP_TIMEOUT_S = 120.0
_MAX_MESSAGE_CHARS = 500


@dataclass(frozen=True)
class _Outcome:
    """One response's result, as a worker sends it back (``failed``: None, ``"timeout"`` or ``"error: ..."``)."""

    score: float
    acc: bool
    pred: str
    failed: str | None = None


class RewardPool:
    """Scores (response, ground truth) pairs in parallel with a per-response timeout.

    ``executor``: ``"process"`` (local worker processes, the default),
    ``"ray"`` (Ray tasks; connects to ``RAY_ADDRESS`` if set, else starts a
    loopback-only local Ray) or ``"inline"`` (in the calling thread, no timeouts;
    for debugging). ``scorer`` replaces ``backend`` with any picklable top-level
    callable ``(solution_str, ground_truth) -> {"score", "acc", "pred"}``.

    Timeout semantics: a response's clock starts when a warmed-up worker
    takes it up, so neither queueing nor worker start-up counts against it.
    With processes that is when a ready worker receives it; with Ray, when the
    task signals its start (at most ``num_workers`` tasks in flight), and a
    task still waiting for a worker after ``STARTUP_TIMEOUT_S`` fails as a
    startup error.

    Custom scorers must be importable where they run: worker processes see the
    caller's ``sys.path``, Ray workers only the driver's working directory,
    script directory and installed packages.

    Concurrent ``score`` calls from several threads are serialised by a lock.
    """

    @classmethod
    def from_config(cls, reward_cfg, *, scorer: Scorer | None = None) -> RewardPool:
        """Build from :class:`dapo_megatron.config.RewardConfig` (``scorer``: a custom function, already imported)."""
        return cls(
            reward_cfg.backend,
            num_workers=reward_cfg.num_workers,
            timeout_s=reward_cfg.timeout_s,
            strict_box_verify=reward_cfg.strict_box_verify,
            executor=reward_cfg.executor,
            scorer=scorer,
        )

    def __init__(
        self,
        backend: str = "math_dapo",
        *,
        num_workers: int = 2,
        timeout_s: float = 10.0,
        strict_box_verify: bool = False,
        executor: str = "process",
        scorer: Scorer | None = None,
    ) -> None:
        if executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be an int >= 1, got {num_workers!r}")
        if (
            isinstance(timeout_s, bool)
            or not isinstance(timeout_s, (int, float))
            or not math.isfinite(timeout_s)
            or timeout_s <= 0
        ):
            raise ValueError(f"timeout_s must be a finite number > 0, got {timeout_s!r}")
        custom = scorer is not None
        if scorer is None:
            if backend not in BACKENDS:
                raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
            scorer = get_scorer(backend, strict_box_verify=strict_box_verify)
        else:
            if not callable(scorer):
                raise ValueError(f"scorer must be callable, got {type(scorer).__name__}")
            if strict_box_verify:
                raise ValueError(
                    "strict_box_verify applies to built-in backends only; bind it into the custom scorer instead"
                )
            if executor == "process":
                try:
                    pickle.dumps(scorer)
                except Exception as exc:
                    raise ValueError(
                        "scorer must be picklable (a top-level function or an instance of a "
                        f"top-level class) for executor='process': {exc}"
                    ) from exc

        self.backend: str | None = None if custom else backend
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.executor = executor
        self._scorer = scorer
        self._lock = threading.Lock()
        self._counters = _Counters()
        self._closed = False
        if executor == "process":
            self._impl: _Executor = _ProcessExecutor(scorer, num_workers, self.timeout_s)
        elif executor == "ray":
            # optional dependency (Ray): the Ray backend loads only when chosen; it also builds on this module
            from dapo_megatron.reward.ray_executor import RayExecutor

            self._impl = RayExecutor(scorer, num_workers, self.timeout_s)
        else:
            self._impl = _InlineExecutor(scorer)

    def score(
        self, responses: Sequence[str], ground_truths: Sequence[str], contexts: Sequence[Context] | None = None
    ) -> ScoredBatch:
        """Score every response; hung or crashed verifiers yield -1.0 and a ``failed`` reason.

        ``contexts[i]`` is response i's (data source, extra info), for scorers that take them.
        """
        if self._closed:
            raise RuntimeError("RewardPool is closed")
        if len(responses) != len(ground_truths):
            raise ValueError(f"responses and ground_truths differ in length: {len(responses)} != {len(ground_truths)}")
        for i, r in enumerate(responses):
            if not isinstance(r, str):
                raise TypeError(f"responses[{i}] must be str, got {type(r).__name__}")
        if contexts is None:
            contexts = [None] * len(responses)
        elif len(contexts) != len(responses):
            raise ValueError(f"responses and contexts differ in length: {len(responses)} != {len(contexts)}")
        items = [(r, str(g), c) for r, g, c in zip(responses, ground_truths, contexts, strict=True)]
        with self._lock:
            t0 = time.perf_counter()
            outcomes = self._impl.run(items) if items else []
            self._counters.add(outcomes, time.perf_counter() - t0, self._impl.pop_restarts())
        failures = [(i, o.failed) for i, o in enumerate(outcomes) if o.failed is not None]
        if failures:
            # Failures are scored as incorrect and training goes on, so say it where people look.
            index, reason = failures[0]
            logger.warning(
                "reward: %d of %d responses failed and scored %.1f (first: response %d, %s)",
                len(failures),
                len(outcomes),
                FAILED_SCORE,
                index,
                reason,
            )
        return ScoredBatch(
            scores=[o.score for o in outcomes],
            acc=[o.acc for o in outcomes],
            preds=[o.pred for o in outcomes],
            failed=[o.failed for o in outcomes],
        )

    def metrics(self) -> dict[str, float]:
        """Counts and wall time accumulated since the previous ``metrics()`` call, then reset.

        Per-interval rather than cumulative so that each training step logs its
        own numbers. ``reward/num_scored`` counts every response handled,
        failed ones included; ``reward/num_worker_restarts`` counts workers
        replaced after a timeout or crash.
        """
        with self._lock:
            return self._counters.pop()

    def close(self) -> None:
        """Stop the workers; idempotent."""
        if not self._closed:
            self._closed = True
            self._impl.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Best effort at garbage collection; interpreter teardown may already
        # have dismantled multiprocessing.
        with contextlib.suppress(Exception):
            self.close()


class _Counters:
    def __init__(self) -> None:
        self.timeouts = self.errors = self.scored = self.restarts = 0
        self.seconds = 0.0

    def add(self, outcomes: list[_Outcome], seconds: float, restarts: int) -> None:
        self.scored += len(outcomes)
        self.timeouts += sum(1 for o in outcomes if o.failed == "timeout")
        self.errors += sum(1 for o in outcomes if o.failed is not None and o.failed != "timeout")
        self.restarts += restarts
        self.seconds += seconds

    def pop(self) -> dict[str, float]:
        out = {
            "reward/num_timeouts": float(self.timeouts),
            "reward/num_errors": float(self.errors),
            "reward/num_scored": float(self.scored),
            "reward/num_worker_restarts": float(self.restarts),
            "timing_s/reward_pool": self.seconds,
        }
        self.__init__()
        return out


# ----------------------------------------------------------------------------
# Shared helpers (also run inside workers: keep them top-level and light).


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= _MAX_MESSAGE_CHARS else text[:_MAX_MESSAGE_CHARS] + "..."


def _coerce(raw: Any) -> tuple[float, bool, str]:
    """Validate a scorer's dict so that a buggy scorer becomes an error, not a corrupt batch."""
    if not isinstance(raw, Mapping):
        raise TypeError(f"scorer returned {type(raw).__name__}, expected a dict")
    missing = [k for k in ("score", "acc") if k not in raw]
    if missing:
        raise KeyError(f"scorer result lacks {missing}")
    score = float(raw["score"])
    if not math.isfinite(score):
        raise ValueError(f"scorer returned non-finite score {score}")
    return score, bool(raw["acc"]), str(raw.get("pred", ""))


def _score_one(scorer: Scorer, response: str, ground_truth: str, context: Context = None) -> _Outcome:
    """The response's outcome, a failed one (``"error: ..."``) if the scorer raised; never raises.

    ``context`` (data source, extra info) reaches only scorers that ask for it
    (``takes_context``, as verl-style reward functions do); the built-in backends never need it.
    """
    try:
        if getattr(scorer, "takes_context", False):
            return _Outcome(*_coerce(scorer(response, ground_truth, context)))
        return _Outcome(*_coerce(scorer(response, ground_truth)))
    except BaseException as exc:  # noqa: BLE001 - SystemExit from a scorer is an error too
        return _failed("error: " + _describe(exc))


def _complete(results: list[_Outcome | None]) -> list[_Outcome]:
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:
        raise RuntimeError(f"internal error: no outcome for responses {missing[:10]}")
    return results  # type: ignore[return-value]


def _failed(reason: str) -> _Outcome:
    return _Outcome(FAILED_SCORE, False, TIMEOUT_PRED if reason == "timeout" else ERROR_PRED, reason)


class _Executor(abc.ABC):
    @abc.abstractmethod
    def run(self, items: list[_Item]) -> list[_Outcome]: ...

    def pop_restarts(self) -> int:
        return 0

    def close(self) -> None:  # noqa: B027 - executors without resources need no clean-up
        return None


class _InlineExecutor(_Executor):
    """In the caller's thread: exceptions are caught, but a hang hangs the caller."""

    def __init__(self, scorer: Scorer) -> None:
        warmup = getattr(scorer, "warmup", None)
        if callable(warmup):
            warmup()
        self._scorer = scorer

    def run(self, items: list[_Item]) -> list[_Outcome]:
        return [_score_one(self._scorer, *item) for item in items]


# ----------------------------------------------------------------------------
# Local worker processes.


def _worker_main(conn: Connection, scorer: Scorer) -> None:
    """Worker loop: warm up, say ready, then score one (index, response, truth) at a time."""
    # Ctrl-C reaches the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        warmup = getattr(scorer, "warmup", None)
        if callable(warmup):
            warmup()
    except BaseException as exc:  # noqa: BLE001
        conn.send(("startup_error", _describe(exc)))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        index, *item = msg
        conn.send((index, _score_one(scorer, *item)))


class _Worker:
    def __init__(self, ctx: Any, scorer: Scorer) -> None:
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child_conn, scorer), name="reward-worker", daemon=True)
        self.process.start()
        child_conn.close()
        self.ready = False
        self.started_at = time.monotonic()
        self.task: int | None = None
        self.deadline = math.inf

    def kill(self) -> None:
        try:
            self.process.kill()
        except (OSError, ValueError):
            pass
        self.process.join(timeout=5.0)
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.process.join(timeout=2.0)
        if self.process.is_alive():
            self.kill()
        else:
            self.conn.close()


class _ProcessExecutor(_Executor):
    def __init__(self, scorer: Scorer, num_workers: int, timeout_s: float) -> None:
        self._ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
        self._scorer = scorer
        self._timeout_s = timeout_s
        self._restarts = 0
        self._startup_failures = 0
        self._last_startup_error = ""
        self._workers = [_Worker(self._ctx, scorer) for _ in range(num_workers)]

    def pop_restarts(self) -> int:
        n, self._restarts = self._restarts, 0
        return n

    def run(self, items: list[_Item]) -> list[_Outcome]:
        results: list[_Outcome | None] = [None] * len(items)
        pending = deque(range(len(items)))
        try:
            while pending or any(w.task is not None for w in self._workers):
                self._dispatch(items, pending)
                self._wait_for_event()
                self._collect(results, pending)
        except BaseException:
            # Interrupted mid-batch (e.g. KeyboardInterrupt): busy workers hold
            # stale tasks, so replace them to leave the pool usable.
            for i, w in enumerate(self._workers):
                if w.task is not None:
                    w.kill()
                    self._workers[i] = _Worker(self._ctx, self._scorer)
            raise
        return _complete(results)

    def _dispatch(self, items: list[_Item], pending: deque[int]) -> None:
        for w in self._workers:
            if not pending:
                return
            if w.ready and w.task is None:
                index = pending.popleft()
                try:
                    w.conn.send((index, *items[index]))
                except (OSError, ValueError):
                    # The worker died while idle; the response was never seen.
                    pending.appendleft(index)
                    continue
                w.task = index
                w.deadline = time.monotonic() + self._timeout_s

    def _wait_for_event(self) -> None:
        now = time.monotonic()
        deadlines = [w.deadline for w in self._workers if w.task is not None]
        deadlines += [w.started_at + STARTUP_TIMEOUT_S for w in self._workers if not w.ready]
        timeout = max(0.0, min(deadlines) - now) if deadlines else None
        handles: list[Any] = [w.conn for w in self._workers]
        handles += [w.process.sentinel for w in self._workers]
        wait(handles, timeout)

    def _collect(self, results: list[_Outcome | None], pending: deque[int]) -> None:
        for i, w in enumerate(self._workers):
            reason = self._drain(w, results)
            now = time.monotonic()
            if reason is None and w.task is not None and now >= w.deadline:
                reason = "timeout"
            if reason is None and not w.ready and now >= w.started_at + STARTUP_TIMEOUT_S:
                reason = f"startup: no ready signal after {STARTUP_TIMEOUT_S:.0f} s"
            if reason is None:
                continue
            w.kill()
            if w.task is not None:
                results[w.task] = _failed(reason)
            elif not w.ready:
                self._note_startup_failure(reason)
            self._workers[i] = _Worker(self._ctx, self._scorer)
            self._restarts += 1

    def _drain(self, w: _Worker, results: list[_Outcome | None]) -> str | None:
        """Read every message from ``w``; the failure reason if it died, else None."""
        try:
            while w.conn.poll():
                msg = w.conn.recv()
                if msg[0] == "ready":
                    w.ready = True
                    self._startup_failures = 0
                elif msg[0] == "startup_error":
                    return f"startup: {msg[1]}"
                else:
                    index, outcome = msg
                    results[index] = outcome
                    w.task = None
                    w.deadline = math.inf
        except (EOFError, OSError):
            # The worker closed its end: it is exiting; give it a moment to be reaped
            # so that its exit code can be reported.
            w.process.join(timeout=1.0)
            return f"error: WorkerDied: {_exit_text(w.process.exitcode)}"
        if w.process.is_alive():
            return None
        return f"error: WorkerDied: {_exit_text(w.process.exitcode)}"

    def _note_startup_failure(self, reason: str) -> None:
        self._startup_failures += 1
        self._last_startup_error = reason
        if self._startup_failures >= max(3, len(self._workers)):
            raise RuntimeError(
                f"reward workers keep failing to start ({self._startup_failures} in a row); "
                f"last: {reason}. Is the scorer importable in a fresh interpreter?"
            )

    def close(self) -> None:
        for w in self._workers:
            w.stop()
        self._workers = []


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
