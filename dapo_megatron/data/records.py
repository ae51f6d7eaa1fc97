"""Record types shared by the data loaders, the rollout and the trainer.

They are plain dataclasses (no tensors) so that they pickle cheaply to rollout
workers and are easy to build by hand in tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The instruction wrapped around every DAPO-Math-17k problem. The rule-based
# verifier looks for the last "Answer: ..." line, so synthetic tasks must use
# exactly the same wording for rewards to mean the same thing.
DAPO_PROMPT_TEMPLATE = (
    "Solve the following math problem step by step. The last line of your "
    "response should be of the form Answer: $Answer (without quotes) where "
    "$Answer is the answer to the problem.\n\n{problem}\n\nRemember to put "
    'your answer on its own line after "Answer:".'
)


@dataclass
class PromptRecord:
    """One de-duplicated prompt, ready for generation.

    ``uid`` identifies the prompt across the run: the responses sampled for
    one prompt are grouped by it for the advantage, and logs / resumed runs
    refer to it. ``prompt_ids`` already include the chat template, so rollout
    engines receive token ids and never re-tokenize (re-tokenizing text can
    differ from the ids the actor is trained on).
    """

    uid: str
    prompt_ids: list[int]
    messages: list[dict[str, str]]
    ground_truth: str
    data_source: str
    extra_info: dict[str, Any] = field(default_factory=dict)


@dataclass
class DatasetStats:
    """What loading did to the raw rows, so silent data loss is visible in logs.

    ``num_rows`` counts rows read from all files; ``num_duplicates`` and
    ``num_too_long`` count rows dropped; ``num_truncated`` counts rows kept
    with shortened prompts; ``num_kept`` is the final dataset size.
    """

    num_rows: int = 0
    num_duplicates: int = 0
    num_too_long: int = 0
    num_truncated: int = 0
    num_kept: int = 0
