"""Reward-pool throughput: process pool (1 and 2 workers) vs scoring in-process.

Why: the pool exists for timeouts and crash isolation; this measures what that
costs (or gains, with several cores) per response, as ratios in one run.

    .venv/bin/python bench/reward_pool.py --responses 4000 --repeats 3
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from dapo_megatron.reward.pool import RewardPool


def make_responses(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    responses, truths = [], []
    for _ in range(n):
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        truth = str(a + b)
        answer = truth if rng.random() < 0.5 else str(a + b + rng.choice([-1, 1, 10]))
        filler = "Let me add the digits one by one, carrying where needed. " * rng.randint(0, 8)
        responses.append(f"{filler}{a} + {b} = {answer}\nAnswer: ${answer}$")
        truths.append(truth)
    return responses, truths


def time_pool(executor: str, workers: int, backend: str, responses, truths, repeats: int) -> float:
    with RewardPool(backend, executor=executor, num_workers=workers, timeout_s=30.0) as pool:
        pool.score(responses[:8], truths[:8])  # start-up is paid once per run, not per step
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            pool.score(responses, truths)
            runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--responses", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="math_dapo")
    args = parser.parse_args()
    responses, truths = make_responses(args.responses)
    base = time_pool("inline", 1, args.backend, responses, truths, args.repeats)
    print(f"backend {args.backend}, {args.responses} responses, median of {args.repeats}")
    print(f"{'executor':<12}{'workers':>8}{'seconds':>10}{'resp/s':>10}{'vs inline':>11}")
    print(f"{'inline':<12}{1:>8}{base:>10.3f}{args.responses / base:>10.0f}{1.0:>11.2f}")
    for workers in (1, 2):
        t = time_pool("process", workers, args.backend, responses, truths, args.repeats)
        print(f"{'process':<12}{workers:>8}{t:>10.3f}{args.responses / t:>10.0f}{t / base:>11.2f}")


if __name__ == "__main__":
    main()
