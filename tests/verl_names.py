"""verl's metric names that a verl dashboard reads and a run of ours must emit.

Renaming one of these metrics silently breaks such dashboards, so the tests hold the names:
unit tests check the functions that compute each family (tests/unit/test_verl_metrics.py,
test_rollout_correction.py, test_verl_val_metrics.py) and tests/e2e/test_base_model_prompts.py
checks that a real two-rank run emits all of them.
"""

from __future__ import annotations

from dapo_megatron.reward.val_metrics import bootstrap_sizes

# every training step (observability/verl_metrics.py, the trainer's batch metrics, the actor's update)
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

# every step with algorithm.rollout_is.enable (algo/rollout_correction.py): verl's token-level
# truncated IS and mismatch diagnostics, then ours
_IS = (
    "mean max min ratio_fraction_high ratio_fraction_low std eff_sample_size seq_mean seq_std seq_max "
    "seq_min seq_max_deviation seq_fraction_high seq_fraction_low"
).split()
_DIAGNOSTICS = (
    "training_ppl training_log_ppl kl k3_kl rollout_ppl rollout_log_ppl log_ppl_diff log_ppl_abs_diff "
    "log_ppl_diff_max log_ppl_diff_min ppl_ratio chi2_token chi2_seq"
).split()
ROLLOUT_CORR_NAMES = (
    *(f"rollout_corr/rollout_is_{name}" for name in _IS),
    *(f"rollout_corr/{name}" for name in _DIAGNOSTICS),
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
