"""The data one stage of a DAPO step hands to the next, in one module.

Why one module: every stage (data, rollout, reward, grouping, dynamic sampling, actor) reads
only these dataclasses, so what crosses a boundary is written down once, and a wrong size is
refused where the value is built, naming the field, instead of surfacing stages later. Types
that are checkpointed (:class:`Group`) or pickled to workers (:class:`PromptRecord`) hold plain
lists; tensors appear only where the actor consumes them. This module does not import torch
(:class:`ActorBatch` works through its tensors' own methods): the reward pool's worker
processes import it in fresh interpreters, where torch would add seconds to every (re)start.

The flow: :class:`PromptRecord` -> engine -> :class:`Rollouts` -> reward pool ->
:class:`ScoredBatch` -> ``experience.build_round`` -> :class:`RoundResult` (one
:class:`Group` per prompt) -> dynamic-sampling buffer -> ``experience.to_actor_batch`` ->
:class:`ActorBatch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["FINISH_REASONS", "ActorBatch", "Group", "PromptRecord", "RoundResult", "Rollouts", "ScoredBatch"]

FINISH_REASONS = ("stop", "length")
"""``stop``: EOS or a stop string/token ended the response; ``length``: max_tokens was hit."""


@dataclass
class PromptRecord:
    """One de-duplicated prompt, ready for generation.

    ``uid`` identifies the prompt across the run: the responses sampled for
    one prompt are grouped by it for the advantage, and logs / resumed runs
    refer to it. ``prompt_ids`` already include the chat template, so rollout
    engines receive token ids and never re-tokenize (re-tokenizing text can
    differ from the ids the actor is trained on). ``extra_info`` is the data
    file's own record, passed through untouched to reward functions that ask for it.
    """

    uid: str
    prompt_ids: list[int]
    messages: list[dict[str, str]]
    ground_truth: str
    data_source: str
    extra_info: dict[str, object] = field(default_factory=dict)


@dataclass
class Rollouts:
    """``n`` responses for each of ``num_prompts`` prompts, flat and in prompt order.

    Response ``j`` of prompt ``i`` is entry ``i * n + j``.  ``logprobs[k][t]`` is the
    engine's log-probability of ``response_ids[k][t]`` (see the engine for which
    distribution: vLLM's ``processed_logprobs`` = after temperature, before top-p/k
    renormalisation only when those filters are off).
    """

    num_prompts: int
    n: int
    prompt_index: list[int]
    response_ids: list[list[int]]
    logprobs: list[list[float]]
    finish_reason: list[str]

    def __post_init__(self) -> None:
        total = self.num_prompts * self.n
        for name in ("prompt_index", "response_ids", "logprobs", "finish_reason"):
            got = len(getattr(self, name))
            if got != total:
                raise ValueError(f"Rollouts.{name} has {got} entries, expected num_prompts*n = {total}")
        for k, (ids, lps) in enumerate(zip(self.response_ids, self.logprobs, strict=True)):
            if len(ids) != len(lps):
                raise ValueError(f"Rollouts response {k}: {len(ids)} token ids but {len(lps)} log-probs")
        bad = sorted({r for r in self.finish_reason if r not in FINISH_REASONS})
        if bad:
            raise ValueError(f"Rollouts.finish_reason has values {bad}, expected one of {FINISH_REASONS}")
        want = [i for i in range(self.num_prompts) for _ in range(self.n)]
        if list(self.prompt_index) != want:
            raise ValueError("Rollouts.prompt_index must be [0]*n + [1]*n + ... (responses grouped by prompt)")

    def __len__(self) -> int:
        return len(self.response_ids)

    @property
    def lengths(self) -> list[int]:
        return [len(r) for r in self.response_ids]

    @property
    def truncated(self) -> list[bool]:
        return [r == "length" for r in self.finish_reason]


@dataclass
class ScoredBatch:
    """Per-response results, index-aligned with the inputs of ``RewardPool.score``.

    ``failed`` is None for a normally scored response, else ``"timeout"`` or
    ``"error: <ExcType>: <message>"``; failed responses have score -1.0 and acc False.
    """

    scores: list[float]
    acc: list[bool]
    preds: list[str]
    failed: list[str | None]

    def __len__(self) -> int:
        return len(self.scores)


@dataclass
class Group:
    """The responses sampled for one draw of a prompt, scored and shaped.

    The unit the dynamic-sampling buffer filters, carries across steps and checkpoints, and
    GRPO normalises over. Plain lists, so a carried group is saved as ``dataclasses.asdict``
    and read back by ``torch.load(weights_only=True)``. Every per-response field has one entry
    per response; the buffer filters on ``acc``, ``score`` or ``seq_reward`` (the names of
    ``algo.FILTER_METRICS``). ``born_step`` is set by the buffer.
    """

    uid: str
    prompt_ids: list[int]
    response_ids: list[list[int]]
    rollout_log_probs: list[list[float]]  # the engine's, per sampled token
    truncated: list[bool]  # hit max_response_length
    acc: list[float]  # the verifier's correctness, 0 or 1
    score: list[float]  # the verifier's raw score
    seq_reward: list[float]  # the score after overlong shaping: what the advantage uses
    born_step: int = 0

    def __post_init__(self) -> None:
        n = len(self.response_ids)
        if n == 0:
            raise ValueError(f"group {self.uid!r} has no responses")
        for name in ("rollout_log_probs", "truncated", "acc", "score", "seq_reward"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"group {self.uid!r}: {name} has {len(getattr(self, name))} entries, not {n}")
        for k, (ids, lps) in enumerate(zip(self.response_ids, self.rollout_log_probs, strict=True)):
            if len(ids) != len(lps):
                raise ValueError(f"group {self.uid!r}: response {k} has {len(ids)} tokens but {len(lps)} log-probs")

    @property
    def size(self) -> int:
        """Number of responses in the group."""
        return len(self.response_ids)


@dataclass
class RoundResult:
    """One generation round, scored and shaped: its groups for the buffer, and what the step's
    metrics count over every generated response (filtered groups included)."""

    groups: list[Group]
    scores: torch.Tensor  # raw verifier scores, [num_prompts * n]
    lengths: torch.Tensor  # response lengths, [num_prompts * n]


@dataclass
class ActorBatch:
    """The sequences one DP rank trains on (or scores) in one call; everything on CPU.

    Per rank, the trainer hands each DP rank its share of the step's prompt groups, with the
    ``group_size`` responses of a prompt contiguous (mini-batches are cut at group boundaries).

    Attributes:
        input_ids: ``[N, S]`` int64, prompt + response tokens, right-padded (any pad id).
        seq_lengths: ``[N]`` int64, number of real tokens (prompt + response) per row.
        prompt_lengths: ``[N]`` int64, prompt tokens per row (>= 1).
        response_mask: ``[N, R]`` bool/0-1: response token ``j`` sits at position
            ``prompt_lengths[i] + j`` of ``input_ids``; ``R`` is the configured maximum response
            length (it is also the constant of "seq-mean-token-sum-norm").  Masked-out response
            tokens (overlong filtering) are simply 0 here.
        old_log_probs: ``[N, R]`` float32, behaviour-policy log-probs (update only).
        advantages: ``[N]`` or ``[N, R]`` float32 (update only).
        group_size: responses per prompt (``rollout.n``); ``N`` must be a multiple of it.
    """

    input_ids: torch.Tensor
    seq_lengths: torch.Tensor
    prompt_lengths: torch.Tensor
    response_mask: torch.Tensor
    old_log_probs: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    group_size: int = 1

    def __post_init__(self) -> None:
        n = self.input_ids.shape[0]
        if self.input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [N, S], got {tuple(self.input_ids.shape)}")
        for name in ("seq_lengths", "prompt_lengths"):
            t = getattr(self, name)
            if t.shape != (n,):
                raise ValueError(f"{name} must be [N]=[{n}], got {tuple(t.shape)}")
        if self.response_mask.dim() != 2 or self.response_mask.shape[0] != n:
            raise ValueError(f"response_mask must be [N={n}, R], got {tuple(self.response_mask.shape)}")
        r = self.response_mask.shape[1]
        if self.old_log_probs is not None and self.old_log_probs.shape != (n, r):
            raise ValueError(f"old_log_probs must be [N, R]=[{n}, {r}], got {tuple(self.old_log_probs.shape)}")
        if self.advantages is not None and self.advantages.shape not in ((n,), (n, r)):
            raise ValueError(f"advantages must be [N] or [N, R] (N={n}, R={r}), got {tuple(self.advantages.shape)}")
        if self.group_size < 1 or n % self.group_size:
            raise ValueError(f"N={n} sequences is not a multiple of group_size={self.group_size}")
        if n and int(self.prompt_lengths.min()) < 1:
            raise ValueError("prompt_lengths must be >= 1 (the first response token needs a context)")
        if n and bool((self.seq_lengths > self.input_ids.shape[1]).any()):
            raise ValueError(f"seq_lengths exceed input_ids width {self.input_ids.shape[1]}")
        resp_len = self.seq_lengths - self.prompt_lengths
        if n and bool((resp_len > r).any()):
            raise ValueError(f"a response is longer than response_mask width R={r}")
        mask = self.response_mask != 0
        positions = resp_len.new_ones(r).cumsum(0) - 1  # 0 .. R-1
        beyond = positions.unsqueeze(0) >= resp_len.unsqueeze(1)
        if bool((mask & beyond).any()):
            raise ValueError("response_mask is set beyond a row's response length (seq_lengths - prompt_lengths)")

    @property
    def num_sequences(self) -> int:
        return self.input_ids.shape[0]

    @property
    def max_response_length(self) -> int:
        return self.response_mask.shape[1]

    def select(self, index: torch.Tensor | Sequence[int]) -> ActorBatch:
        """The rows ``index`` (in that order), e.g. one mini-batch.

        The result has ``group_size=1``: an arbitrary row selection need not keep prompt groups
        whole, and nothing below the mini-batch split looks at groups.
        """
        idx = self.seq_lengths.new_tensor(index) if isinstance(index, Sequence) else index

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[idx]

        return ActorBatch(
            input_ids=self.input_ids[idx],
            seq_lengths=self.seq_lengths[idx],
            prompt_lengths=self.prompt_lengths[idx],
            response_mask=self.response_mask[idx],
            old_log_probs=pick(self.old_log_probs),
            advantages=pick(self.advantages),
            group_size=1,
        )
