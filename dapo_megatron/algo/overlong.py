"""Overlong reward shaping and overlong filtering (DAPO section 3.4).

A response cut off at the length limit gets a wrong-answer score although its
reasoning may have been fine; punishing that as hard as a real mistake is
reward noise. DAPO softens it two ways: a linear length penalty inside a
buffer zone before the limit (shaping, so the model learns to stay short
before it gets truncated), and optionally masking the loss of truncated
responses entirely (filtering: ``algorithm.mask_truncated_responses``, applied where the
actor's batch is built, :func:`dapo_megatron.experience.to_actor_batch`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _validate(max_response_length: int, buffer_length: int, penalty_factor: float) -> None:
    if max_response_length <= 0:
        raise ValueError(f"max_response_length must be > 0, got {max_response_length}")
    if buffer_length <= 0:
        raise ValueError(f"buffer_length must be > 0, got {buffer_length}")
    if buffer_length > max_response_length:
        raise ValueError(f"buffer_length ({buffer_length}) must be <= max_response_length ({max_response_length})")
    if penalty_factor < 0:
        raise ValueError(f"penalty_factor must be >= 0, got {penalty_factor}")


def overlong_penalty(
    response_lengths: torch.Tensor | Sequence[int],
    *,
    max_response_length: int,
    buffer_length: int,
    penalty_factor: float,
) -> torch.Tensor:
    """Length penalty ``min(-(L - (L_max - L_buf)) / L_buf * alpha, 0)`` per response.

    0 up to ``L_max - L_buf`` tokens, falling linearly to ``-alpha`` at
    ``L_max``; responses cannot be longer than ``L_max`` so the penalty stays in
    ``[-alpha, 0]``. Returns float32 [B] (rewards are float32 everywhere else).
    """
    _validate(max_response_length, buffer_length, penalty_factor)
    lengths = torch.as_tensor(response_lengths).to(torch.float32)
    if lengths.dim() != 1:
        raise ValueError(f"response_lengths must be 1-D [B], got shape {tuple(lengths.shape)}")
    if bool((lengths < 0).any()):
        raise ValueError("response_lengths must be >= 0")
    exceed = lengths - (max_response_length - buffer_length)
    return torch.clamp(-exceed / buffer_length * penalty_factor, max=0.0)


def apply_overlong_shaping(
    scores: torch.Tensor,
    response_lengths: torch.Tensor | Sequence[int],
    *,
    enable: bool,
    max_response_length: int | None,
    buffer_length: int | None,
    penalty_factor: float | None,
) -> torch.Tensor:
    """Shaped rewards ``score + overlong_penalty`` (a new tensor; scores untouched).

    Apply it to train *and* validation rewards, as the recipe does, but keep the
    unshaped accuracy for dynamic-sampling filters: filtering on the shaped
    reward makes groups of equally wrong answers of different lengths look
    informative. With ``enable=False`` the length settings may be None.
    """
    scores = torch.as_tensor(scores)
    if not scores.dtype.is_floating_point:
        scores = scores.to(torch.float32)
    if not enable:
        return scores.clone()
    if max_response_length is None or buffer_length is None or penalty_factor is None:
        raise ValueError("overlong shaping is enabled but max_response_length, buffer_length or penalty_factor is None")
    penalty = overlong_penalty(
        response_lengths,
        max_response_length=max_response_length,
        buffer_length=buffer_length,
        penalty_factor=penalty_factor,
    )
    if penalty.shape != scores.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and response_lengths {tuple(penalty.shape)} differ")
    return scores + penalty.to(device=scores.device, dtype=scores.dtype)
