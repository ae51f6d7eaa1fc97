"""Held-out accuracy, scored avg@k as the DAPO paper reports AIME (avg@32).

Why one generate call with n = k: every problem gets exactly k samples from the
validation sampling parameters (top_p 0.7 in the recipe), and their per-problem
mean is what avg@k averages; a fixed seed makes validation of the same weights
repeatable, so a change between two evaluations is the policy's, not the dice's
(``rollout.val.seed``).

verl's metric family (:func:`~dapo_megatron.reward.val_metrics.verl_val_metrics`) comes with
ours: ``acc`` (the verifier's correctness), ``score`` (its score) and ``reward`` (the score
after overlong shaping, as verl's DAPO reward manager also shapes validation rewards), with
the verifier's predicted answers voting for maj@n.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dapo_megatron.config import DapoConfig
from dapo_megatron.contract import PromptRecord
from dapo_megatron.experience import shape_rewards
from dapo_megatron.reward.pool import RewardPool
from dapo_megatron.reward.sharded import score_sharded
from dapo_megatron.reward.val_metrics import avg_at_k, verl_val_metrics
from dapo_megatron.rollout.engine import RolloutEngine
from dapo_megatron.rollout.sampling import val_sampling


def validate(
    cfg: DapoConfig,
    engine: RolloutEngine,
    pool: RewardPool,
    tokenizer,
    records: Sequence[PromptRecord],
) -> dict[str, float]:
    """avg@k accuracy per data source plus mean score and response length (collective)."""
    if not records:
        raise ValueError("validation set is empty")
    k = cfg.rollout.val.n
    spec = val_sampling(cfg.rollout.val, cfg.data.max_response_length, tuple(cfg.rollout.stop))
    rollouts = engine.generate([r.prompt_ids for r in records], k, spec, cfg.rollout.val.seed)
    texts = tokenizer.batch_decode(rollouts.response_ids, skip_special_tokens=True)
    truths = [r.ground_truth for r in records for _ in range(k)]
    scored = score_sharded(pool, texts, truths, [(r.data_source, r.extra_info) for r in records for _ in range(k)])
    uids = [r.uid for r in records for _ in range(k)]
    sources = [r.data_source for r in records for _ in range(k)]
    scores, rewards = shape_rewards(cfg, scored, rollouts)
    values = {"acc": [float(a) for a in scored.acc], "score": scores.tolist(), "reward": rewards.tolist()}
    metrics = verl_val_metrics(values, uids, sources, scored.preds)
    metrics.update(avg_at_k(scored.acc, uids, sources))
    lengths = torch.tensor(rollouts.lengths, dtype=torch.float32)
    metrics["val-aux/score/mean"] = float(torch.tensor(scored.scores).mean())
    metrics["val-aux/response_length/mean"] = float(lengths.mean())
    metrics["val-aux/response_length/clip_ratio"] = float(torch.tensor(rollouts.truncated, dtype=torch.float32).mean())
    return metrics
