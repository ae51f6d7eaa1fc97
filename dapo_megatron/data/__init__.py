"""Prompt data for DAPO: loading, de-duplication, sampling, and a synthetic task.

Why this package exists as its own layer: RL training consumes *prompts*, not
text corpora. Every prompt must carry a verifiable ground truth and a stable
uid (the n responses of one prompt form a GRPO group, and resume must not skip
or repeat prompts). Bad rows therefore fail loudly at load time, naming file,
row and field, instead of surfacing as a reward of -1 hundreds of steps later.

Modules (imported explicitly; this file re-exports nothing so that importing
the sampler does not pull in transformers):

* ``records``: the DAPO prompt template and the record / statistics types.
* ``parquet_dataset``: DAPO-Math-format parquet -> de-duplicated, tokenized
  ``PromptDataset``.
* ``sampler``: ``ResumableSampler``, an epoch-aware index stream whose state
  is a small dict saved with checkpoints.
* ``tokenizer``: a tiny offline BPE tokenizer with a Qwen2-style chat template
  for CPU-sized experiments.
* ``synthetic``: an arithmetic task in the DAPO-Math schema
  (``dapo-make-task`` console script).
"""

# data.truncation: what ``parquet_dataset.load_prompt_dataset`` does with a prompt longer than
# data.max_prompt_length when filter_overlong_prompts is off; here (not re-exported) so the
# schema reads it without pyarrow
TRUNCATION_MODES: tuple[str, ...] = ("error", "left", "right")
