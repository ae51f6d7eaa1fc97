"""math_dapo scores as verl's math_dapo does; math_lenient keeps the forgiving rules under its own name.

Every row is a case where the two verifiers can disagree, with verl's result: the kinds seen
when a few thousand generated solutions were scored by both (strict box mode without
normalisation, markdown around "Answer:", the first $...$ of a sentence, string rather than
numeric comparison, commas next to a sign), plus the extraction rules around them.
"""

from __future__ import annotations

import pickle

import pytest

from dapo_megatron.reward import BACKENDS, BackendScorer, get_scorer, math_lenient
from dapo_megatron.reward.math_dapo import INVALID, compute_score

FILLER = "Let me think about this carefully. " * 12  # > 300 characters

# (response, ground truth, strict_box_verify, verl's score, verl's pred)
VERL_CASES = [
    # strict box mode: the box content against the ground truth as given, no normalisation
    ("So the total is \\boxed{1,000}", "1000", True, -1.0, "1,000"),
    ("Half of it: \\boxed{1/2}", "\\frac{1}{2}", True, -1.0, "1/2"),
    ("Half of it: \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", True, 1.0, "\\frac{1}{2}"),
    ("\\boxed{ 42}", "42", True, -1.0, " 42"),
    ("first \\boxed{4}, then \\boxed{5", "4", True, -1.0, INVALID),  # the last box is cut off
    ("\\boxed {42}", "42", True, -1.0, INVALID),  # a space before the brace is no box
    ("\\boxed{42}" + FILLER[:100], "42", True, -1.0, INVALID),  # not in the last 100 characters
    ("Answer: 42", "42", True, -1.0, INVALID),  # strict mode reads boxes only
    # markdown around "Answer:" stays in the prediction
    ("**Answer:** 42", "42", False, -1.0, "**42"),
    ("Answer: **42**", "42", False, -1.0, "**42**"),
    # the first $...$ of the answer line is the answer
    ("Answer: The final answer is $1,000$. I hope it is correct.", "1000", False, 1.0, "1000"),
    ("Answer: $3$ or $4$", "3", False, 1.0, "3"),
    # strings after normalisation, not numbers
    ("Answer: 3.14", "3.140", False, -1.0, "3.14"),
    ("Answer: 0.5", "\\frac{1}{2}", False, -1.0, "0.5"),
    ("Answer: 42.", "42", False, -1.0, "42."),
    ("Answer: 5.0", "5", False, -1.0, "5.0"),
    # commas are dropped only when all that remains is digits
    ("Answer: -1,000", "-1000", False, -1.0, "-1,000"),
    ("Answer: 1,000", "1000", False, 1.0, "1000"),
    ("Answer: 1,000.5", "1000.5", False, -1.0, "1,000.5"),
    ("Answer: 3{,}000", "3000", False, 1.0, "3000"),
    # extraction: the last "Answer:" line of the last 300 characters, any case
    ("answer: 7\nAnswer: 8", "8", False, 1.0, "8"),
    ("ANSWER :9", "9", False, 1.0, "9"),
    ("Answer: 8\n" + FILLER, "8", False, -1.0, INVALID),
    ("The result is 8.", "8", False, -1.0, INVALID),
    # normalisation shared with verl: after "=", units, degrees, shorthand TeX, boxes, \text
    ("Answer: x = 5", "5", False, 1.0, "5"),
    ("Answer: 5 cm", "5", False, 1.0, "5"),
    ("Answer: $90^\\circ$", "90", False, 1.0, "90"),
    ("Answer: $\\frac12$", "\\frac{1}{2}", False, 1.0, "\\frac{1}{2}"),
    ("Answer: $\\dfrac{1}{2}$", "\\frac{1}{2}", False, -1.0, "\\dfrac{1}{2}"),
    ("Answer: \\sqrt2", "\\sqrt{2}", False, 1.0, "\\sqrt{2}"),
    ("Answer: \\boxed{42}", "42", False, 1.0, "42"),
    ("Answer: \\text{(B)}", "B", False, -1.0, "(B)"),
    ("Answer: an apple", "apple", False, 1.0, "apple"),
]


@pytest.mark.parametrize(("response", "truth", "strict", "score", "pred"), VERL_CASES)
def test_scores_as_verl(response, truth, strict, score, pred):
    out = compute_score(response, truth, strict_box_verify=strict)
    assert out == {"score": score, "acc": score > 0, "pred": pred}


# The kinds named in the issue, where the lenient verifier gives the other answer.
DISAGREE = [
    ("So the total is \\boxed{1,000}", "1000", True),
    ("Half of it: \\boxed{1/2}", "\\frac{1}{2}", True),
    ("**Answer:** 42", "42", False),
    ("Answer: The final answer is $1,000$. I hope it is correct.", "1000", False),
    ("Answer: 3.14", "3.140", False),
    ("Answer: -1,000", "-1000", False),
]


@pytest.mark.parametrize(("response", "truth", "strict"), DISAGREE)
def test_lenient_backend_is_the_other_verifier(response, truth, strict):
    ours = compute_score(response, truth, strict_box_verify=strict)["acc"]
    lenient = math_lenient.compute_score(response, truth, strict_box_verify=strict)["acc"]
    assert ours != lenient


def test_backends_by_name():
    assert {"math_dapo", "math_lenient", "math_verify"} <= set(BACKENDS)
    assert get_scorer("math_dapo")("Answer: 3.14", "3.140")["acc"] is False
    assert get_scorer("math_lenient")("Answer: 3.14", "3.140")["acc"] is True
    scorer = pickle.loads(pickle.dumps(get_scorer("math_lenient", strict_box_verify=True)))
    assert scorer == BackendScorer("math_lenient", True)


def test_non_string_response_raises():
    with pytest.raises(TypeError, match="solution_str"):
        compute_score(None, "1")  # type: ignore[arg-type]
