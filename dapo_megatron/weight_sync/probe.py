"""Function check after a weight sync: the engine and the actor must agree on log-probs.

Checksums prove that the engine's tensors hold the actor's values; they cannot prove
that the engine *computes* with those tensors.  vLLM keeps derived state beside some
weights (on CPU, repacked GEMM kernels; a tied LM head shares the embedding's storage
but has a kernel of its own), and a tensor that was updated while its kernel was not
passes any checksum of the tensor.  So after a verified sync the engine samples a few
responses to fixed prompts and the actor scores the same tokens: with identical
weights the gap is rounding (fp32 on CPU: about 1e-6 per token), with a stale layer
it is orders of magnitude larger.

Collective: every rank calls it with the same prompts (engine generation and the
actor's log-prob pass are both collective).  Every rank computes the same result:
the engine returns all prompts' samples everywhere and every data-parallel rank of
the actor scores the whole (small) probe batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dapo_megatron.contract import ActorBatch
from dapo_megatron.experience import pack_sequences
from dapo_megatron.rollout.engine import SamplingSpec
from dapo_megatron.rollout.mismatch import logprob_mismatch

__all__ = ["ProbeResult", "probe_batch", "probe_policy"]


@dataclass(frozen=True)
class ProbeResult:
    mean_abs_diff: float
    max_abs_diff: float
    tokens: int


def probe_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int) -> ActorBatch:
    """Prompt + sampled response per row, the response tokens masked in (empty responses stay unmasked)."""
    width = max(1, max(len(r) for r in responses))
    return pack_sequences(prompts, responses, response_width=width, pad_token_id=pad_id)


def probe_policy(
    engine, actor, prompts: Sequence[Sequence[int]], sampling: SamplingSpec, *, seed: int, pad_id: int
) -> ProbeResult:
    """Sample ``prompts`` once each with the engine, score the tokens with the actor, compare.

    Non-finite actor log-probs (weights that overflowed in the last update) give an infinite gap.
    """
    rollouts = engine.generate(prompts, 1, sampling, seed)
    batch = probe_batch(prompts, rollouts.response_ids, pad_id)
    actor_lp, _ = actor.compute_log_probs(batch, compute_entropy=False)
    mask = batch.response_mask.bool()
    if not bool(torch.isfinite(actor_lp[mask]).all()):
        # overflowed weights: no gap to measure; the trainer's finite-policy check stops the run
        return ProbeResult(math.inf, math.inf, int(mask.sum()))
    engine_lp = torch.zeros_like(actor_lp)
    for i, lps in enumerate(rollouts.logprobs):
        engine_lp[i, : len(lps)] = torch.tensor(lps, dtype=torch.float32)
    stats = logprob_mismatch(actor_lp, engine_lp, batch.response_mask)
    return ProbeResult(stats["mean_abs_diff"], stats["max_abs_diff"], int(stats["tokens"]))
