"""The DAPO recipe's verifier, scoring exactly as verl's ``math_dapo`` does.

Why exactly and not "better": a different reward is a different experiment. Accuracy curves,
dynamic-sampling rates and published baselines are only comparable when every response gets
the score verl's recipe would give it, including the cases where that score looks wrong
(``Answer: 3.14`` against ``3.140``, ``**Answer:** 42``). The forgiving verifier that
this project used before is kept as ``reward.backend=math_lenient``
(:mod:`dapo_megatron.reward.math_lenient`); docs/VERL_COMPAT.md lists how the two differ.

verl's rules, as this module reproduces them:

* Only the last 300 characters of a response are read.
* Default mode: the text after the last "Answer:" (any case, to the end of its line) is the
  prediction. Prediction and ground truth are normalised by the same ordered list of string
  replacements, then compared as strings: no numeric or symbolic equality. Commas are dropped
  only when what remains is all digits, so a sign or a decimal point keeps them.
* Strict box mode: the content of the last ``\\boxed{`` in the last 100 characters, compared
  with the ground truth as given: no normalisation of either side.
"""

from __future__ import annotations

import re

from dapo_megatron.reward.math_lenient import matching_brace

INVALID = "[INVALID]"
TAIL_CHARS = 300
BOX_TAIL_CHARS = 100

_ANSWER_RE = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")

# Plain replacements, in verl's order (first its substitutions, then its deletions). Order
# matters: "an " goes before spaces do, "mbox" becomes "text" before the "\text{...}" rules.
# fmt: off
_REPLACEMENTS: tuple[tuple[str, str], ...] = (
    ("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
    (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"),
) + tuple((word, "") for word in (
    "square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots",
    "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds",
    "meters", "meals", "edges", "students", "childrentickets", "multiples",
    "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}",
    "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;", ",\\!", "{,}", '"', "\\dots",
))
# fmt: on

# Regular rewrites, applied one after another (each over the whole string) in this order.
# ``[^\n]`` is a dot that stops at line ends; ``[^{]`` in the fraction rule does not.
_REWRITES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"[^\n]*?\$([^\n]*?)\$[^\n]*"), r"$\1$"),  # keep the first $...$ of a line
    (re.compile(r"\\text\{([^\n]*?)\}"), r"\1"),  # up to the first closing brace
    (re.compile(r"\\textbf\{([^\n]*?)\}"), r"\1"),
    (re.compile(r"\\overline\{([^\n]*?)\}"), r"\1"),
    (re.compile(r"\\boxed\{([^\n]*)\}"), r"\1"),  # up to the last closing brace
    (re.compile(r"frac([^{])([^\n])"), r"frac{\1}{\2}"),  # \frac12 -> \frac{1}{2}
    (re.compile(r"sqrt([^{])"), r"sqrt{\1}"),  # \sqrt2 -> \sqrt{2}
)


def compute_score(solution_str: str, ground_truth: str, strict_box_verify: bool = False) -> dict:
    """+1.0 when the response's answer matches ``ground_truth`` under verl's rules, else -1.0."""
    if not isinstance(solution_str, str):
        raise TypeError(f"solution_str must be str, got {type(solution_str).__name__}")
    tail = solution_str[-TAIL_CHARS:]
    truth = str(ground_truth)
    if strict_box_verify:
        boxed = last_boxed_content(tail[-BOX_TAIL_CHARS:])
        pred = INVALID if boxed is None else boxed
        correct = pred == truth
    else:
        pred = normalize_answer(extract_answer(tail) or INVALID)
        correct = pred == normalize_answer(truth)
    return {"score": 1.0 if correct else -1.0, "acc": correct, "pred": pred}


def extract_answer(text: str) -> str | None:
    """The rest of the line after the last "Answer:" (any case); None when there is none."""
    found = _ANSWER_RE.findall(text)
    return found[-1] if found else None


def last_boxed_content(text: str) -> str | None:
    """Content of the last ``\\boxed{``; None when there is none or its braces never close.

    Only the last occurrence counts: a truncated final box is no answer even when an
    earlier box is complete.
    """
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    open_brace = start + len("\\boxed")
    close = matching_brace(text, open_brace)
    return None if close is None else text[open_brace + 1 : close]


def normalize_answer(text: str) -> str:
    """verl's normalisation: what follows the last "=", then fixed replacements and rewrites."""
    s = text.rsplit("=", 1)[-1]
    for old, new in _REPLACEMENTS:
        s = s.replace(old, new)
    for pattern, repl in _REWRITES:
        s = pattern.sub(repl, s)
    s = s.replace("$", "")
    without_commas = s.replace(",", "")
    if without_commas.isdigit():
        s = without_commas
    return s.strip()
