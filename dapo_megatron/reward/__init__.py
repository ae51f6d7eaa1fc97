"""Rule-based rewards for math RL, and a pool that scores responses safely in parallel.

Why a pool at all: verifiers are plain Python on untrusted model output. A
regex or sympy call can hang or crash on a pathological answer, and one such
response must not stall a training step that holds a whole GPU cluster. So
scoring runs in worker processes with a per-response timeout
(:mod:`dapo_megatron.reward.pool`); a hung or crashed verifier becomes an
incorrect answer plus a counter in the metrics.

Backends (``get_scorer`` names):

* ``"math_dapo"`` - the DAPO recipe's verifier, scoring exactly as verl's math_dapo:
  last "Answer:" line, normalised, exact string match. Fast and never hangs.
* ``"math_lenient"`` - the same extraction with a more forgiving normalisation (markdown,
  trailing periods, units, number forms such as 3.140 = 3.14); not comparable with verl runs.
* ``"math_verify"`` - HF math-verify, symbolic equivalence via sympy; needs the
  optional ``math-verify`` package.

Every scorer has the signature ``(solution_str, ground_truth) -> dict`` with
keys ``score`` (+1.0 / -1.0), ``acc`` (bool) and ``pred`` (str).
"""

from __future__ import annotations

from dataclasses import dataclass

from dapo_megatron.reward import math_dapo, math_lenient, math_verify_backend

BACKENDS = ("math_dapo", "math_lenient", "math_verify")
_MODULES = {"math_dapo": math_dapo, "math_lenient": math_lenient, "math_verify": math_verify_backend}
# where :class:`~dapo_megatron.reward.pool.RewardPool` runs the scorer (here, not in pool.py,
# so the config reads it without multiprocessing)
EXECUTORS = ("process", "ray", "inline")


@dataclass(frozen=True)
class BackendScorer:
    """A picklable scorer bound to one backend and its options.

    A small class rather than a closure because worker processes and Ray
    tasks receive the scorer by pickling; ``warmup`` lets a worker pay
    math-verify's import cost before it is handed its first (timed) response.
    """

    backend: str
    strict_box_verify: bool = False

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    def __call__(self, solution_str: str, ground_truth: str) -> dict:
        return _MODULES[self.backend].compute_score(
            solution_str, ground_truth, strict_box_verify=self.strict_box_verify
        )

    def warmup(self) -> None:
        """Import the backend's heavy optional dependency (math-verify's sympy) now rather than inside a timed call."""
        if self.backend == "math_verify":
            math_verify_backend.require_math_verify()


def get_scorer(backend: str, strict_box_verify: bool = False) -> BackendScorer:
    """A picklable ``(solution_str, ground_truth) -> dict`` scorer for ``backend``.

    Fails here, in the caller's process, when the backend's optional dependency
    is missing - not later inside every worker.
    """
    scorer = BackendScorer(backend, bool(strict_box_verify))
    if backend == "math_verify":
        math_verify_backend.check_installed()
    return scorer


__all__ = ["BACKENDS", "BackendScorer", "get_scorer"]
