"""Sampling parameters from the config, and their translation to vLLM.

Training and validation sample differently (DAPO validates with top_p=0.7 and its own
``n``), so they come from two config sections; both share the response budget
``data.max_response_length`` so validation can never produce longer answers than
training was shaped for.
"""

from __future__ import annotations

from dapo_megatron.config import RolloutConfig, ValSamplingConfig
from dapo_megatron.rollout.engine import SamplingSpec

__all__ = ["train_sampling", "val_sampling", "to_vllm_sampling_params", "request_seed"]

_SEED_MOD = 2**31 - 1


def train_sampling(cfg: RolloutConfig, max_response_length: int) -> SamplingSpec:
    """Rollout sampling for training: ``rollout.{temperature,top_p,top_k,stop}``."""
    return SamplingSpec(
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        max_tokens=max_response_length,
        stop=tuple(cfg.stop),
    )


def val_sampling(cfg: ValSamplingConfig, max_response_length: int, stop: tuple[str, ...] = ()) -> SamplingSpec:
    """Validation sampling: ``rollout.val``; ``do_sample=False`` means greedy (temperature 0)."""
    return SamplingSpec(
        temperature=cfg.temperature if cfg.do_sample else 0.0,
        top_p=cfg.top_p if cfg.do_sample else 1.0,
        top_k=cfg.top_k if cfg.do_sample else -1,
        max_tokens=max_response_length,
        stop=tuple(stop),
    )


def request_seed(seed: int, prompt_index: int, n: int) -> int:
    """Seed of one prompt's request; vLLM gives its j-th sample ``seed + j``.

    Depends only on the call seed and the prompt's *global* index, never on which
    replica serves it, so the same call gives the same samples under any rollout
    TP/DP layout, and no two samples of one call share a seed.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return (seed * 1_000_003 + prompt_index * n) % (_SEED_MOD - n)


def to_vllm_sampling_params(spec: SamplingSpec, *, n: int, seed: int | None):
    """vLLM ``SamplingParams`` returning the sampled token's log-prob (``logprobs=0``)."""
    from vllm import SamplingParams  # optional dependency: vLLM (the package imports without it)

    return SamplingParams(
        n=n,
        temperature=spec.temperature,
        top_p=spec.top_p,
        top_k=spec.top_k if spec.top_k > 0 else 0,
        max_tokens=spec.max_tokens,
        stop=list(spec.stop) or None,
        stop_token_ids=list(spec.stop_token_ids) or None,
        seed=seed,
        logprobs=0,
        detokenize=bool(spec.stop),
    )
