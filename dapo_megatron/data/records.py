"""What the data loaders share: the DAPO prompt wording and the loading statistics.

The prompt record they produce is a stage type: :class:`dapo_megatron.contract.PromptRecord`.
"""

from __future__ import annotations

from dataclasses import dataclass

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
