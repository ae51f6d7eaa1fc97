"""Step metrics under verl's names and definitions, so dashboards from verl runs read ours unchanged.

Why a module of its own: a metric that carries verl's name but not verl's definition is worse
than a different name, since two curves that look comparable are not. Each function here
computes one verl metric family from the whole step's data (every rank holds all groups), not
from one data-parallel rank's shard.

* ``critic/advantages/{mean,max,min}``: over every response token of the trained batch, as
  verl masks advantages with the response mask (a long response weighs more in the mean).
* ``perf/total_num_tokens``: prompt + response tokens of the trained batch;
  ``perf/throughput``: those tokens per second of the whole step per GPU (process).
  The throughput this project logged before (generated tokens per second per data-parallel
  rank) is kept as ``perf/generation_throughput``.
* ``training/global_step``, ``training/epoch``.

The names other metric families share with verl are defined where they are computed:
``algo/rollout_correction.py`` (every step with ``algorithm.rollout_is.enable``) and
``reward/val_metrics.py`` (every validation).  tests/verl_names.py lists every verl name
a run must emit, and the tests check the functions here and a real run against it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def advantage_metrics(advantages: torch.Tensor, response_lengths: Sequence[int]) -> dict[str, float]:
    """verl's critic/advantages/*: each response's advantage counted once per response token."""
    if advantages.ndim != 1 or advantages.numel() != len(response_lengths):
        raise ValueError(f"{advantages.numel()} advantages for {len(response_lengths)} responses")
    lengths = torch.as_tensor(list(response_lengths), dtype=torch.float64)
    valid = lengths > 0
    if not bool(valid.any()):
        return {}
    adv = advantages.to(torch.float64)
    return {
        "critic/advantages/mean": float((adv * lengths).sum() / lengths.sum()),
        "critic/advantages/max": float(adv[valid].max()),
        "critic/advantages/min": float(adv[valid].min()),
    }


def throughput_metrics(
    prompt_lengths: Sequence[int],
    response_lengths: Sequence[int],
    *,
    step_seconds: float,
    num_gpus: int,
    generated_tokens: float,
    dp_size: int,
) -> dict[str, float]:
    """verl's perf/total_num_tokens and perf/throughput, plus our generation throughput under its own name."""
    if len(prompt_lengths) != len(response_lengths):
        raise ValueError(f"{len(prompt_lengths)} prompt lengths for {len(response_lengths)} responses")
    total = float(sum(prompt_lengths) + sum(response_lengths))
    seconds = max(step_seconds, 1e-9)
    return {
        "perf/total_num_tokens": total,
        "perf/throughput": total / seconds / num_gpus,
        "perf/generation_throughput": generated_tokens / seconds / dp_size,
    }


def progress_metrics(step: int, epoch: int) -> dict[str, float]:
    return {"training/global_step": float(step), "training/epoch": float(epoch)}
