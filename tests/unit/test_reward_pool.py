"""RewardPool: parallel scoring that survives hanging, raising and crashing verifiers."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dapo_megatron.contract import ScoredBatch
from dapo_megatron.reward.math_dapo import compute_score
from dapo_megatron.reward.pool import RewardPool

REPO = Path(__file__).resolve().parents[2]


# Scorers run in worker processes, so they must be importable top-level callables.
def chaos_scorer(response: str, truth: str) -> dict:
    """Misbehaves on command; otherwise the real verifier."""
    if response == "hang":
        while True:
            pass
    if response == "sleep":
        time.sleep(3600)
    if response == "raise":
        raise ValueError("boom")
    if response == "exit":
        os._exit(3)
    if response == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    if response == "bad-result":
        return {"score": float("nan"), "acc": True}
    return compute_score(response, truth)


def pid_scorer(response: str, truth: str) -> dict:
    time.sleep(float(response))
    return {"score": 1.0, "acc": True, "pred": str(os.getpid())}


class SlowWarmupScorer:
    def warmup(self) -> None:
        time.sleep(1.0)

    def __call__(self, response: str, truth: str) -> dict:
        return compute_score(response, truth)


class BrokenWarmupScorer:
    def warmup(self) -> None:
        raise ImportError("verifier library missing")

    def __call__(self, response: str, truth: str) -> dict:
        raise AssertionError("never called")


RESPONSES = ["Answer: 1", "Answer: $2$", "x = 3\nAnswer: x = 3", "no answer", "Answer: 5 cm"]
TRUTHS = ["1", "2", "3", "4", "6"]


@pytest.fixture(scope="module")
def chaos_pool():
    with RewardPool(scorer=chaos_scorer, num_workers=2, timeout_s=0.5) as pool:
        yield pool


def test_matches_in_process_scoring_and_keeps_order() -> None:
    with RewardPool("math_dapo", num_workers=2, timeout_s=10.0) as pool:
        batch = pool.score(RESPONSES * 4, TRUTHS * 4)
        metrics = pool.metrics()
    expected = [compute_score(r, t) for r, t in zip(RESPONSES * 4, TRUTHS * 4, strict=True)]
    assert isinstance(batch, ScoredBatch) and len(batch) == 20
    assert batch.scores == [e["score"] for e in expected]
    assert batch.acc == [e["acc"] for e in expected]
    assert batch.preds == [e["pred"] for e in expected]
    assert batch.failed == [None] * 20
    assert metrics["reward/num_scored"] == 20
    assert metrics["reward/num_timeouts"] == metrics["reward/num_errors"] == 0


@pytest.mark.timeout(60)
def test_hangs_exceptions_and_crashes_become_incorrect(chaos_pool: RewardPool) -> None:
    chaos_pool.metrics()
    bad = ["hang", "raise", "exit", "segv", "sleep", "bad-result"]
    responses = [x for pair in zip(RESPONSES + ["Answer: 1"], bad, strict=True) for x in pair]
    truths = [t for t in TRUTHS + ["1"] for _ in range(2)]
    batch = chaos_pool.score(responses, truths)  # the hang and the sleep end as timeouts, not as a stuck test

    for i in range(0, len(responses), 2):
        assert batch.failed[i] is None
        assert batch.scores[i] == compute_score(responses[i], truths[i])["score"]
    failures = dict(zip(bad, zip(batch.failed[1::2], batch.preds[1::2], batch.scores[1::2], strict=True), strict=True))
    assert failures["hang"] == ("timeout", "[TIMEOUT]", -1.0)
    assert failures["sleep"] == ("timeout", "[TIMEOUT]", -1.0)
    assert failures["raise"] == ("error: ValueError: boom", "[ERROR]", -1.0)
    assert failures["exit"][0] == "error: WorkerDied: exit code 3"
    assert failures["segv"][0] == "error: WorkerDied: killed by SIGSEGV"
    assert failures["bad-result"][0].startswith("error: ValueError: scorer returned non-finite")
    assert not any(batch.acc[1::2])

    metrics = chaos_pool.metrics()
    assert metrics["reward/num_timeouts"] == 2
    assert metrics["reward/num_errors"] == 4
    assert metrics["reward/num_scored"] == 12
    assert metrics["reward/num_worker_restarts"] == 4  # hang, sleep, exit, segv
    assert metrics["timing_s/reward_pool"] > 0
    # Counters are per interval: a second call starts from zero.
    assert chaos_pool.metrics()["reward/num_scored"] == 0

    # Replaced workers keep serving.
    again = chaos_pool.score(RESPONSES, TRUTHS)
    assert again.failed == [None] * len(RESPONSES)


def test_workers_persist_across_calls() -> None:
    with RewardPool(scorer=pid_scorer, num_workers=2, timeout_s=5.0) as pool:
        seen: set[str] = set()
        for _ in range(20):  # on a loaded machine the second worker may become ready calls later
            seen |= set(pool.score(["0.05"] * 6, ["x"] * 6).preds)
            if len(seen) == 2:
                break
        later = set(pool.score(["0.05"] * 6, ["x"] * 6).preds)
        restarts = pool.metrics()["reward/num_worker_restarts"]
    assert len(seen) == 2
    assert later <= seen  # the same two processes, no new one
    assert restarts == 0
    assert str(os.getpid()) not in seen


def test_timeout_is_per_response_not_per_batch() -> None:
    # 10 x 0.25 s on 2 workers takes ~1.25 s, longer than the 0.8 s timeout.
    with RewardPool(scorer=pid_scorer, num_workers=2, timeout_s=0.8) as pool:
        start = time.monotonic()
        batch = pool.score(["0.25"] * 10, ["x"] * 10)
        assert time.monotonic() - start > 0.8
    assert batch.failed == [None] * 10


def test_worker_start_up_does_not_count_against_the_timeout() -> None:
    with RewardPool(scorer=SlowWarmupScorer(), num_workers=2, timeout_s=0.3) as pool:
        batch = pool.score(["Answer: 1"] * 4, ["1"] * 4)
    assert batch.failed == [None] * 4
    assert batch.acc == [True] * 4


def test_workers_that_cannot_start_raise_a_clear_error() -> None:
    with RewardPool(scorer=BrokenWarmupScorer(), num_workers=2, timeout_s=1.0) as pool:
        with pytest.raises(RuntimeError, match="verifier library missing"):
            pool.score(["Answer: 1"], ["1"])


def test_empty_batch() -> None:
    with RewardPool(executor="inline") as pool:
        batch = pool.score([], [])
    assert batch == ScoredBatch([], [], [], [])


def test_inline_executor_catches_errors_in_process(caplog: pytest.LogCaptureFixture) -> None:
    with RewardPool(scorer=chaos_scorer, executor="inline") as pool:
        with caplog.at_level("WARNING", logger="dapo_megatron.reward.pool"):
            batch = pool.score(["Answer: 1", "raise"], ["1", "1"])
        assert batch.acc == [True, False]
        assert batch.failed == [None, "error: ValueError: boom"]
        assert pool.metrics()["reward/num_errors"] == 1
    assert "1 of 2 responses failed and scored -1.0 (first: response 1, error: ValueError: boom)" in caplog.text


def test_strict_box_verify_is_passed_to_the_backend() -> None:
    with RewardPool(strict_box_verify=True, executor="inline") as pool:
        assert pool.score(["\\boxed{4}", "Answer: 4"], ["4", "4"]).acc == [True, False]


def test_math_verify_backend_in_worker_processes() -> None:
    with RewardPool("math_verify", num_workers=2, timeout_s=20.0) as pool:
        batch = pool.score(["Answer: 0.5", "Answer: $x^2+1$", "Answer: 3"], ["\\frac12", "1+x^2", "4"])
    assert batch.failed == [None, None, None]
    assert batch.acc == [True, True, False]


def _lambda_scorer():
    return lambda r, t: {"score": 1.0, "acc": True, "pred": ""}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_workers": 0}, "num_workers"),
        ({"num_workers": 1.5}, "num_workers"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"timeout_s": math.nan}, "timeout_s"),
        ({"timeout_s": math.inf}, "timeout_s"),
        ({"executor": "threads"}, "executor"),
        ({"backend": "regex"}, "backend"),
        ({"scorer": 42}, "scorer"),
        ({"scorer": chaos_scorer, "strict_box_verify": True}, "strict_box_verify"),
    ],
)
def test_argument_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RewardPool(**kwargs)


def test_unpicklable_scorer_is_rejected_for_processes() -> None:
    with pytest.raises(ValueError, match="scorer must be picklable"):
        RewardPool(scorer=_lambda_scorer())
    # In-process scoring has no such constraint.
    with RewardPool(scorer=_lambda_scorer(), executor="inline") as pool:
        assert pool.score(["a"], ["b"]).acc == [True]


def test_input_validation_and_closed_pool() -> None:
    pool = RewardPool(executor="inline")
    with pytest.raises(ValueError, match="responses and ground_truths differ in length"):
        pool.score(["a", "b"], ["a"])
    with pytest.raises(TypeError, match=r"responses\[1\]"):
        pool.score(["a", None], ["a", "b"])  # type: ignore[list-item]
    pool.close()
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.score(["a"], ["a"])


_DIST_SCRIPT = """
import json, os, sys, threading, time
import torch
import torch.distributed as dist
sys.path[:0] = [{repo!r}, {tests!r}]
from test_reward_pool import chaos_scorer
from dapo_megatron.reward.pool import RewardPool

def main():
    dist.init_process_group("gloo", init_method="file://" + {store!r}, rank=0, world_size=1)
    dist.all_reduce(torch.ones(4))
    torch.set_num_threads(2)
    stop = threading.Event()
    threads = [threading.Thread(target=stop.wait, daemon=True) for _ in range(16)]
    for t in threads:
        t.start()
    with RewardPool(scorer=chaos_scorer, num_workers=2, timeout_s=0.5) as pool:
        batch = pool.score(["Answer: 1", "hang", "segv", "Answer: 2"], ["1", "x", "x", "3"])
        method = pool._impl._ctx.get_start_method()
    stop.set()
    dist.destroy_process_group()
    print(json.dumps({{"acc": batch.acc, "failed": batch.failed, "method": method}}))

if __name__ == "__main__":
    main()
"""


@pytest.mark.timeout(120)
def test_safe_in_a_process_with_torch_distributed_and_threads(tmp_path: Path) -> None:
    script = tmp_path / "trainer_like.py"
    script.write_text(
        textwrap.dedent(
            _DIST_SCRIPT.format(repo=str(REPO), tests=str(Path(__file__).parent), store=str(tmp_path / "store"))
        )
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=110, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["method"] == "forkserver"
    assert out["acc"] == [True, False, False, False]
    assert out["failed"][0] is None and out["failed"][3] is None
    assert out["failed"][1] == "timeout"
    assert out["failed"][2] == "error: WorkerDied: killed by SIGSEGV"
