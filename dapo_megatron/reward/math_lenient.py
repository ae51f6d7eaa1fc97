"""A forgiving math verifier in the DAPO style (``reward.backend=math_lenient``).

Why it exists next to ``math_dapo``: verl's verifier (``math_dapo``, the default) marks
right answers wrong when they are dressed differently - ``**Answer:** 42``, ``3.140`` for
``3.14``, ``-1,000``, a boxed ``1,000`` in strict mode. This one removes such presentation
noise (units, LaTeX wrappers, shorthand, number forms) on both sides and still compares
strings, so it never hangs and costs microseconds. Its scores are not comparable with
verl runs; docs/VERL_COMPAT.md lists where the two differ.

Decisions beyond verl's rules:

* Commas are dropped when the answer consists only of digits, commas and an
  optional sign/decimal part ("1,000" -> "1000"), as in the reference.
* Numbers are canonicalised slightly further than the reference: ".5" -> "0.5",
  "2.50" -> "2.5", "5.0" -> "5", "3/4" -> "\\frac{3}{4}".
* All whitespace is removed at the end, so "x + 1" equals "x+1".
* An empty normalised prediction is never correct.
"""

from __future__ import annotations

import re
from collections.abc import Callable

INVALID = "[INVALID]"
# Only the end of a response is searched: the prompt asks for the answer on the
# last line, and scanning a 20k-token response for "Answer:" would reward
# answers that the model later revised.
TAIL_CHARS = 300
BOX_TAIL_CHARS = 100

_ANSWER_RE = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")

# Units are only stripped when they trail a value, so a variable named "m" or
# an answer like "\text{meters}" on its own survives. Single letters are too
# ambiguous to strip unless separated by whitespace or wrapped in \text{}.
# fmt: off
_UNIT_WORDS = (
    "meters", "meter", "metres", "metre", "centimeters", "centimeter", "millimeters",
    "millimeter", "kilometers", "kilometer", "cm", "mm", "km", "inches", "inch",
    "feet", "foot", "ft", "yards", "yard", "yd", "miles", "mile", "mph", "kph",
    "liters", "liter", "litres", "litre", "ml", "mL", "grams", "gram", "kg", "mg",
    "pounds", "pound", "lbs", "lb", "ounces", "ounce", "oz", "tons", "ton",
    "seconds", "second", "secs", "sec", "minutes", "minute", "mins", "min",
    "hours", "hour", "hrs", "hr", "days", "day", "weeks", "week", "months", "month",
    "years", "year", "yrs", "dollars", "dollar", "cents", "cent", "degrees", "degree",
    "units", "unit", "percent", "ways", "people", "students",
)
# fmt: on
_UNIT_LETTERS = ("m", "g", "s", "h", "L", "l")
_POWER = r"(?:\^\{?[23]\}?)?"
_AREA = r"(?:(?:square|sq\.?|cubic)\s*)?"
_ALL_UNITS = "|".join(sorted(_UNIT_WORDS + _UNIT_LETTERS, key=len, reverse=True))
_WORD_UNITS = "|".join(sorted(_UNIT_WORDS, key=len, reverse=True))
_LETTER_UNITS = "|".join(_UNIT_LETTERS)

_TEXT_UNIT_RE = re.compile(
    r"^(?P<value>.+?)\s*\\(?:text|mbox|mathrm|textrm)\{\s*" + _AREA + r"(?:" + _ALL_UNITS + r")\s*\}" + _POWER + r"\s*$"
)
_WORD_UNIT_RE = re.compile(r"^(?P<value>.*[\d})])\s*" + _AREA + r"(?:" + _WORD_UNITS + r")" + _POWER + r"\s*$")
_LETTER_UNIT_RE = re.compile(r"^(?P<value>.*[\d})])\s+(?:" + _LETTER_UNITS + r")" + _POWER + r"\s*$")

_UNWRAP_COMMANDS = ("boxed", "fbox", "text", "textbf", "textrm", "mbox", "mathrm", "mathbf", "overline")
# fmt: off
_DELETE_TOKENS = (
    "\\displaystyle", "^{\\circ}", "^\\circ", "\\circ", "\u00b0", "\\degree",
    "\\%", "%", "\\$", "$", "\\(", "\\)", "\\[", "\\]", "\\!", "\\,", "\\;", "\\:",
    "\\qquad", "\\quad",
)
# fmt: on
_DIGITS_AND_COMMAS_RE = re.compile(r"^-?[\d,]*\d[\d,]*(?:\.\d+)?$")
_DECIMAL_RE = re.compile(r"^(-?)(\d*)\.(\d+)$")
_SLASH_FRACTION_RE = re.compile(r"^(-?)(\d+)/(\d+)$")


def compute_score(solution_str: str, ground_truth: str, strict_box_verify: bool = False) -> dict:
    """Score one response: +1.0 when the normalised answer equals the ground truth, else -1.0.

    ``strict_box_verify`` requires the answer in a final ``\\boxed{}`` instead of an
    "Answer:" line, for prompts that ask for boxed answers.
    """
    if not isinstance(solution_str, str):
        raise TypeError(f"solution_str must be str, got {type(solution_str).__name__}")
    if strict_box_verify:
        raw = last_boxed_content(solution_str[-BOX_TAIL_CHARS:])
    else:
        raw = extract_answer(solution_str[-TAIL_CHARS:])
    if raw is None:
        return {"score": -1.0, "acc": False, "pred": INVALID}
    pred = normalize_answer(raw)
    correct = pred != "" and pred == normalize_answer(str(ground_truth))
    return {"score": 1.0 if correct else -1.0, "acc": correct, "pred": pred}


def extract_answer(text: str) -> str | None:
    """The text after the last "Answer:" in ``text`` (the model may restate it; the last wins)."""
    matches = _ANSWER_RE.findall(text)
    return matches[-1] if matches else None


def last_boxed_content(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``; None when absent or its braces never close.

    A truncated box is treated as no answer: accepting a prefix would reward
    responses cut off by the length limit.
    """
    start = text.rfind("\\boxed")
    while start != -1:
        brace = start + len("\\boxed")
        while brace < len(text) and text[brace] == " ":
            brace += 1
        if brace < len(text) and text[brace] == "{":
            end = matching_brace(text, brace)
            return None if end is None else text[brace + 1 : end]
        start = text.rfind("\\boxed", 0, start)
    return None


def normalize_answer(text: str) -> str:
    """Canonical string form of an answer; applied to both prediction and ground truth.

    Repeated to a fixed point: one pass can expose a pattern an earlier step
    removes (dropping whitespace turns "\\ ," into the thin space "\\,"), and
    a non-idempotent normaliser would make "a == b" depend on how often each
    side had been normalised.
    """
    s = text
    for _ in range(8):
        again = _normalize_once(s)
        if again == s:
            break
        s = again
    return s


def _normalize_once(text: str) -> str:
    s = text.strip().strip("*").strip()
    s = s.replace("\u2212", "-").replace("{,}", ",")
    s = _unwrap(s, ("boxed", "fbox"))
    s = s.replace("\\$", "").replace("$", "")
    if "=" in s:
        s = s.rsplit("=", 1)[1]
    s = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", s)
    s = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", s)
    for token in _DELETE_TOKENS:
        s = s.replace(token, "")
    s = _strip_units(s.strip())
    s = _unwrap(s, _UNWRAP_COMMANDS)
    s = _strip_units(s.strip())
    s = _fix_fracs(s)
    s = _fix_sqrt(s)
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = _strip_outer_braces(s)
    return _canonical_number(s)


def _strip_units(s: str) -> str:
    for _ in range(3):
        for pattern in (_TEXT_UNIT_RE, _WORD_UNIT_RE, _LETTER_UNIT_RE):
            m = pattern.match(s)
            if m and m.group("value").strip():
                s = m.group("value").rstrip()
                break
        else:
            return s
    return s


def _canonical_number(s: str) -> str:
    if _DIGITS_AND_COMMAS_RE.match(s):
        s = s.replace(",", "")
    m = _DECIMAL_RE.match(s)
    if m:
        sign, whole, frac = m.groups()
        frac = frac.rstrip("0")
        whole = whole or "0"
        s = f"{sign}{whole}.{frac}" if frac else f"{sign}{whole}"
        return "0" if s == "-0" else s
    m = _SLASH_FRACTION_RE.match(s)
    if m:
        sign, num, den = m.groups()
        return f"{sign}\\frac{{{num}}}{{{den}}}"
    return s


def matching_brace(s: str, open_idx: int) -> int | None:
    depth = 0
    for i in range(open_idx, len(s)):
        if s[i] == "{":
            depth += 1
        elif s[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def _unwrap(s: str, commands: tuple[str, ...]) -> str:
    """Replace ``\\cmd{X}`` by X for each command; leaves unbalanced occurrences alone."""
    pattern = re.compile(r"\\(?:" + "|".join(commands) + r")(?![a-zA-Z])\s*\{")
    pos = 0
    while True:
        m = pattern.search(s, pos)
        if m is None:
            return s
        close = matching_brace(s, m.end() - 1)
        if close is None:
            pos = m.end()
            continue
        s = s[: m.start()] + s[m.end() : close] + s[close + 1 :]
        pos = m.start()


def _read_arg(s: str, i: int) -> tuple[str, int] | None:
    """One TeX macro argument at ``s[i:]`` (group, control word or single char) and its end."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        return None
    if s[i] == "{":
        close = matching_brace(s, i)
        return None if close is None else (s[i + 1 : close], close + 1)
    if s[i] == "\\":
        m = re.match(r"\\(?:[a-zA-Z]+|.)", s[i:])
        if m is None:
            return None
        return m.group(0), i + m.end()
    if s[i] in "}^_":
        return None
    return s[i], i + 1


def _rewrite_args(s: str, pattern: str, nargs: int, render: Callable[[re.Match, list[str]], str]) -> str:
    """Each match of ``pattern`` followed by ``nargs`` TeX arguments, rewritten as ``render(match, args)``;
    a match whose arguments cannot be read is left as it is."""
    out, pos = [], 0
    for m in re.finditer(pattern, s):
        if m.start() < pos:
            continue
        args, end = [], m.end()
        for _ in range(nargs):
            arg = _read_arg(s, end)
            if arg is None:
                break
            args.append(arg[0])
            end = arg[1]
        else:
            out += [s[pos : m.start()], render(m, args)]
            pos = end
    out.append(s[pos:])
    return "".join(out)


def _fix_fracs(s: str) -> str:
    """``\\frac12`` and ``\\frac1{x}`` -> ``\\frac{1}{2}``, ``\\frac{1}{x}`` (what TeX renders the same)."""
    return _rewrite_args(
        s, r"\\frac(?![a-zA-Z])", 2, lambda m, a: f"\\frac{{{_fix_fracs(a[0])}}}{{{_fix_fracs(a[1])}}}"
    )


def _fix_sqrt(s: str) -> str:
    """``\\sqrt2`` -> ``\\sqrt{2}``; an optional ``[n]`` index is kept."""
    return _rewrite_args(
        s, r"\\sqrt(?![a-zA-Z])\s*(\[[^\]]*\])?", 1, lambda m, a: f"\\sqrt{m.group(1) or ''}{{{_fix_sqrt(a[0])}}}"
    )


def _strip_outer_braces(s: str) -> str:
    while len(s) >= 2 and s[0] == "{" and matching_brace(s, 0) == len(s) - 1:
        s = s[1:-1]
    return s
