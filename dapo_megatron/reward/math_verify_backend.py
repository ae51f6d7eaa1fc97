"""Symbolic verifier through HF's math-verify, with the same contract as ``math_dapo``.

Why a second backend: exact string match marks "0.5" vs "\\frac{1}{2}" or
"x^2+1" vs "1+x^2" wrong; math-verify parses both sides to sympy and compares
them, at the price of being slower and able to hang on pathological input.

Timeouts: math-verify bounds its own parse/verify steps with ``signal.alarm``,
which Python only allows in the main thread. In the scoring pool every
response is scored in the main thread of a worker process, so those internal
timeouts stay on; when called from any other thread they are switched off
(math-verify would raise otherwise) and the caller's timeout - the pool's
per-response kill - is the only bound.
"""

from __future__ import annotations

import importlib.util
import threading
from types import ModuleType

from dapo_megatron.reward.math_lenient import (
    BOX_TAIL_CHARS,
    INVALID,
    TAIL_CHARS,
    extract_answer,
    last_boxed_content,
)

# Shorter than the pool's default per-response timeout (10 s) so that a slow
# sympy comparison ends as a clean "incorrect" instead of a killed worker.
PARSE_TIMEOUT_S = 4
VERIFY_TIMEOUT_S = 4

_INSTALL_HINT = (
    "the 'math_verify' reward backend needs the math-verify package: "
    "pip install 'math-verify>=0.7' (or the project's [math_verify] extra)"
)


def check_installed() -> None:
    """Raise the install hint when math-verify is absent, without importing it (sympy is heavy)."""
    if importlib.util.find_spec("math_verify") is None:
        raise ImportError(_INSTALL_HINT)


def require_math_verify() -> ModuleType:
    """Import math_verify on first use, with an actionable error when it is missing.

    Importing lazily keeps ``import dapo_megatron.reward`` cheap (sympy and
    antlr load in ~0.3 s+) and keeps math-verify an optional dependency.
    """
    try:
        import math_verify  # optional dependency: the [math_verify] extra, and sympy is slow to load
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return math_verify


def compute_score(solution_str: str, ground_truth: str, strict_box_verify: bool = False) -> dict:
    """+1.0 when math-verify judges the extracted answer equivalent to the ground truth, else -1.0.

    The prediction is the last "Answer:" line of the response tail, or the last
    ``\\boxed{}`` when there is none; with ``strict_box_verify`` only a box in the
    last 100 characters counts, mirroring ``math_dapo``.
    """
    mv = require_math_verify()
    if not isinstance(solution_str, str):
        raise TypeError(f"solution_str must be str, got {type(solution_str).__name__}")
    raw = _extract_prediction(solution_str, strict_box_verify)
    if raw is None:
        return {"score": -1.0, "acc": False, "pred": INVALID}

    in_main = threading.current_thread() is threading.main_thread()
    parse_timeout = PARSE_TIMEOUT_S if in_main else None
    verify_timeout = VERIFY_TIMEOUT_S if in_main else None

    gold = mv.parse(_as_boxed(str(ground_truth)), parsing_timeout=parse_timeout)
    pred = mv.parse(_as_boxed(raw), parsing_timeout=parse_timeout)
    if not pred:
        # Free text such as "The answer is 42" is better found by the
        # unanchored extractors than inside a box.
        pred = mv.parse(raw, parsing_timeout=parse_timeout)
    if not pred:
        return {"score": -1.0, "acc": False, "pred": raw.strip()}
    correct = bool(gold) and bool(mv.verify(gold, pred, timeout_seconds=verify_timeout))
    shown = pred[-1] if isinstance(pred[-1], str) else str(pred[0])
    return {"score": 1.0 if correct else -1.0, "acc": correct, "pred": shown}


def _extract_prediction(solution_str: str, strict_box_verify: bool) -> str | None:
    if strict_box_verify:
        return last_boxed_content(solution_str[-BOX_TAIL_CHARS:])
    tail = solution_str[-TAIL_CHARS:]
    answer = extract_answer(tail)
    if answer is not None:
        return answer.strip().strip("*").strip().rstrip(".")
    return last_boxed_content(tail)


def _as_boxed(text: str) -> str:
    """Wrap bare answers in ``\\boxed{}`` so that math-verify's LaTeX extractor sees them.

    Bare "\\frac12" or "(1, 2)" are not found without LaTeX anchors; text that
    already carries math delimiters is passed unchanged.
    """
    stripped = text.strip()
    if "$" in stripped or "\\boxed" in stripped or "\\(" in stripped or "\\[" in stripped:
        return stripped
    return f"\\boxed{{{stripped}}}"
