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

Two sibling lists pin the names of other metric families: :data:`ROLLOUT_CORR_NAMES` (every
step with ``algorithm.rollout_is.enable``; definitions in ``algo/rollout_correction.py``) and
:func:`val_names` (every validation; definitions in ``reward/val_metrics.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dapo_megatron.reward.val_metrics import bootstrap_sizes

# verl's names that every training step emits, pinned by tests (a unit test holds the list, an
# end-to-end run checks the names appear); renaming one silently breaks verl dashboards.
STEP_NAMES = (
    "critic/advantages/mean",
    "critic/advantages/max",
    "critic/advantages/min",
    "critic/score/mean",
    "critic/rewards/mean",
    "response_length/mean",
    "response_length/clip_ratio",
    "perf/total_num_tokens",
    "perf/throughput",
    "perf/time_per_step",
    "training/global_step",
    "training/epoch",
    "actor/pg_loss",
    "actor/pg_clipfrac",
    "actor/ppo_kl",
)

# verl's rollout-correction names (token-level truncated IS and its mismatch diagnostics), then ours.
ROLLOUT_CORR_NAMES = (
    *(
        f"rollout_corr/rollout_is_{name}"
        for name in (
            "mean",
            "max",
            "min",
            "ratio_fraction_high",
            "ratio_fraction_low",
            "std",
            "eff_sample_size",
            "seq_mean",
            "seq_std",
            "seq_max",
            "seq_min",
            "seq_max_deviation",
            "seq_fraction_high",
            "seq_fraction_low",
        )
    ),
    *(
        f"rollout_corr/{name}"
        for name in (
            "training_ppl",
            "training_log_ppl",
            "kl",
            "k3_kl",
            "rollout_ppl",
            "rollout_log_ppl",
            "log_ppl_diff",
            "log_ppl_abs_diff",
            "log_ppl_diff_max",
            "log_ppl_diff_min",
            "ppl_ratio",
            "chi2_token",
            "chi2_seq",
        )
    ),
    "rollout_is/weight_mean",
    "rollout_is/weight_min",
    "rollout_is/capped_frac",
)


def val_names(data_source: str, n: int) -> list[str]:
    """The validation names pinned for one data source sampled n > 1 times: verl's (its core
    metrics at n, best/maj/worst for the bootstrap sizes, score and reward means) and ours."""
    ds = data_source
    names = [
        f"val-core/{ds}/acc/mean@{n}",
        f"val-core/{ds}/acc/best@{n}/mean",
        f"val-core/{ds}/acc/best@{n}/std",
        f"val-core/{ds}/acc/maj@{n}/mean",
        f"val-core/{ds}/acc/maj@{n}/std",
        f"val-aux/{ds}/acc/std@{n}",
        f"val-aux/{ds}/score/mean@{n}",
        f"val-aux/{ds}/reward/mean@{n}",
        f"val-aux/{ds}/score/best@{n}/mean",
        f"val-aux/{ds}/reward/maj@{n}/mean",
    ]
    for size in bootstrap_sizes(n)[:-1]:
        names += [
            f"val-aux/{ds}/acc/{kind}@{size}/{stat}" for kind in ("best", "worst", "maj") for stat in ("mean", "std")
        ]
    names += [f"val-aux/{ds}/acc/worst@{n}/mean", f"val-aux/{ds}/acc/worst@{n}/std"]
    # ours: the plots and the demo's verdict read mean@n and sem@n
    names += [f"val-aux/{ds}/pass@{n}", f"val-aux/{ds}/acc/sem@{n}", f"val-aux/{ds}/acc/problem_std@{n}"]
    return names


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
