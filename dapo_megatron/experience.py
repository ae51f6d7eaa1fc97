"""From one generation round to prompt groups, and from kept groups to the actor's batch.

Why groups carry plain lists: a :class:`~dapo_megatron.contract.Group` may sit in the
dynamic-sampling buffer across steps and goes into the checkpoint with it, so it is small,
picklable and independent of any device or layout.

Why the data-parallel split is by mini-batch: mini-batch ``m`` of the step is groups
``[m * mini, (m + 1) * mini)`` whatever the data-parallel size, and rank ``d`` takes
its ``mini / dp`` groups of every mini-batch. So the optimizer sees the same
mini-batches (and, with the global token-mean, the same gradients) at DP=1 and DP=8.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dapo_megatron.algo.advantage import grpo_advantage
from dapo_megatron.algo.overlong import apply_overlong_shaping
from dapo_megatron.config import DapoConfig
from dapo_megatron.contract import ActorBatch, Group, PromptRecord, Rollouts, RoundResult, ScoredBatch


def shape_rewards(cfg: DapoConfig, scored: ScoredBatch, rollouts: Rollouts) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw scores, overlong-shaped rewards) for every response of the round."""
    ob = cfg.algorithm.overlong_buffer
    scores = torch.tensor(scored.scores, dtype=torch.float32)
    shaped = apply_overlong_shaping(
        scores,
        torch.tensor(rollouts.lengths, dtype=torch.long),
        enable=ob.enable,
        max_response_length=cfg.data.max_response_length,
        buffer_length=ob.len,
        penalty_factor=ob.penalty_factor,
    )
    return scores, shaped


def build_round(
    cfg: DapoConfig, records: Sequence[PromptRecord], rollouts: Rollouts, scored: ScoredBatch, *, draw: str = ""
) -> RoundResult:
    """Cut a round into one group per prompt, with everything training needs later.

    A group's uid names one draw of a prompt, ``<prompt uid>@<draw>.<position>``: a run longer
    than an epoch draws the same prompt again, within one step's rounds or even one round when
    the sampler wraps, and those are separate groups (for the buffer and for GRPO's grouping).
    """
    if rollouts.num_prompts != len(records):
        raise ValueError(f"rollouts cover {rollouts.num_prompts} prompts but {len(records)} records were given")
    if len(scored) != len(rollouts):
        raise ValueError(f"{len(scored)} scores for {len(rollouts)} responses")
    n = rollouts.n
    scores, shaped = shape_rewards(cfg, scored, rollouts)
    groups = []
    for i, rec in enumerate(records):
        sl = slice(i * n, (i + 1) * n)
        groups.append(
            Group(
                uid=f"{rec.uid}@{draw}.{i}" if draw else rec.uid,
                prompt_ids=list(rec.prompt_ids),
                response_ids=[list(r) for r in rollouts.response_ids[sl]],
                rollout_log_probs=[list(lp) for lp in rollouts.logprobs[sl]],
                truncated=rollouts.truncated[sl],
                acc=[float(a) for a in scored.acc[sl]],
                score=scores[sl].tolist(),
                seq_reward=shaped[sl].tolist(),
            )
        )
    return RoundResult(groups=groups, scores=scores, lengths=torch.tensor(rollouts.lengths, dtype=torch.long))


def dp_shard(groups: Sequence[Group], *, mini_batch_groups: int, dp_size: int, dp_rank: int) -> list[Group]:
    """This data-parallel rank's groups: its ``mini / dp`` share of every mini-batch, in order."""
    if mini_batch_groups % dp_size:
        raise ValueError(f"ppo_mini_batch_size={mini_batch_groups} is not divisible by data-parallel size {dp_size}")
    if len(groups) % mini_batch_groups:
        raise ValueError(f"{len(groups)} groups do not fill whole mini-batches of {mini_batch_groups}")
    per_rank = mini_batch_groups // dp_size
    mine: list[Group] = []
    for start in range(0, len(groups), mini_batch_groups):
        lo = start + dp_rank * per_rank
        mine.extend(groups[lo : lo + per_rank])
    return mine


def advantages_for(groups: Sequence[Group], *, norm_by_std: bool) -> torch.Tensor:
    """GRPO advantages of every response, from the shaped reward, group by group."""
    rewards = torch.tensor([r for g in groups for r in g.seq_reward], dtype=torch.float32)
    ids = [g.uid for g in groups for _ in g.seq_reward]
    return grpo_advantage(rewards, ids, norm_by_std=norm_by_std)


def to_actor_batch(
    groups: Sequence[Group],
    *,
    max_response_length: int,
    pad_token_id: int,
    mask_truncated: bool,
    advantages: torch.Tensor | None = None,
) -> ActorBatch:
    """Pack groups into the actor's right-padded batch (prompt + response per row)."""
    sizes = {g.size for g in groups}
    if len(sizes) > 1:
        raise ValueError(f"groups of different sizes {sorted(sizes)} cannot form one batch")
    return pack_sequences(
        [g.prompt_ids for g in groups for _ in g.response_ids],
        [r for g in groups for r in g.response_ids],
        response_width=max_response_length,
        pad_token_id=pad_token_id,
        masked_out=[mask_truncated and t for g in groups for t in g.truncated],
        advantages=advantages,
        group_size=sizes.pop() if sizes else 1,
    )


def pack_sequences(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    response_width: int,
    pad_token_id: int,
    masked_out: Sequence[bool] | None = None,
    **fields,
) -> ActorBatch:
    """Prompt + response per row, right-padded; each row's response tokens are in the loss mask
    unless ``masked_out`` says otherwise.  ``fields``: the batch's other fields (advantages, ...)."""
    seq_lengths = torch.tensor([len(p) + len(r) for p, r in zip(prompts, responses, strict=True)], dtype=torch.long)
    input_ids = torch.full((len(prompts), int(seq_lengths.max()) if prompts else 1), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((len(prompts), response_width), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        if len(r) > response_width:
            raise ValueError(f"response {i} has {len(r)} tokens, more than max_response_length={response_width}")
        input_ids[i, : len(p) + len(r)] = torch.tensor([*p, *r], dtype=torch.long)
        response_mask[i, : len(r)] = not (masked_out and masked_out[i])
    prompt_lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    return ActorBatch(input_ids, seq_lengths, prompt_lengths, response_mask, **fields)


def rollout_log_probs(groups: Sequence[Group], max_response_length: int) -> torch.Tensor:
    """The engine's log-probs of the sampled tokens, [N, R], zero-padded."""
    rows = [lp for g in groups for lp in g.rollout_log_probs]
    out = torch.zeros((len(rows), max_response_length), dtype=torch.float32)
    for i, lp in enumerate(rows):
        out[i, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
    return out
