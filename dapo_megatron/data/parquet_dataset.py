"""Load DAPO-Math-format parquet files into a de-duplicated, tokenized dataset.

Why the strictness: a prompt with a missing or mistyped ground truth does not
crash an RL run, it silently scores -1 forever and biases every group it is
in. So every row is validated up front, and errors name file, row and field.
Why de-duplication by default: the public DAPO-Math-17k file holds each
prompt about 100 times; training on it unmodified makes one "epoch" 100
passes over the same prompts and skews batch statistics.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import pyarrow as pa
import pyarrow.parquet as pq

from dapo_megatron.contract import PromptRecord
from dapo_megatron.data import TRUNCATION_MODES
from dapo_megatron.data.records import DatasetStats

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# Tokenizing in chunks bounds peak memory of the batch encoder on big files.
_ENCODE_CHUNK = 4096


class DataError(ValueError):
    """A data file is unusable; the message names file, row and field."""


@dataclass
class _Row:
    """A validated row before tokenization; keeps its origin for messages."""

    file: Path
    row: int
    messages: list[dict[str, str]]
    ground_truth: str
    data_source: str
    extra_info: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.file}, row {self.row}"


class PromptDataset(Sequence[PromptRecord]):
    """An immutable sequence of prompts plus the statistics of how it was built."""

    def __init__(self, records: list[PromptRecord], stats: DatasetStats) -> None:
        self._records = records
        self.stats = stats

    def __len__(self) -> int:
        return len(self._records)

    @overload
    def __getitem__(self, index: int) -> PromptRecord: ...

    @overload
    def __getitem__(self, index: slice) -> list[PromptRecord]: ...

    def __getitem__(self, index: int | slice) -> PromptRecord | list[PromptRecord]:
        return self._records[index]

    def __repr__(self) -> str:
        return f"PromptDataset(len={len(self)}, stats={self.stats})"


def load_prompt_dataset(
    files: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_prompt_length: int,
    prompt_key: str = "prompt",
    dedup: bool = True,
    filter_overlong_prompts: bool = True,
    truncation: str = "error",
    apply_chat_template: bool = True,
) -> PromptDataset:
    """Read, validate, de-duplicate, tokenize and length-check prompt rows.

    Over-long prompts are dropped when ``filter_overlong_prompts`` is set
    (the usual choice: a truncated math problem is a different problem);
    otherwise ``truncation`` decides: "error" raises, "left" keeps the end
    of the prompt (where the question and generation prompt are), "right"
    keeps the start. Without the chat template (``data.apply_chat_template:
    false``, for base models) the prompt column may also hold plain strings;
    the message contents are joined by newlines and tokenized as is, with the
    tokenizer's own special-token rule (e.g. a BOS), as a base model expects.
    """
    if max_prompt_length <= 0:
        raise ValueError(f"max_prompt_length must be positive, got {max_prompt_length}")
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    if apply_chat_template and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the tokenizer has no chat template (a base model's?); set data.apply_chat_template=false to "
            "tokenize prompts as plain text, or give a tokenizer with a template (data.tokenizer_path)"
        )
    paths = _as_paths(files)
    stats = DatasetStats()

    rows: list[_Row] = []
    for path in paths:
        rows.extend(_read_file(path, prompt_key, plain_text_ok=not apply_chat_template))
    stats.num_rows = len(rows)

    if dedup:
        rows = _deduplicate(rows)
        stats.num_duplicates = stats.num_rows - len(rows)

    token_ids = _encode(rows, tokenizer, apply_chat_template)
    records: list[PromptRecord] = []
    taken_uids: set[str] = set()
    for row, ids in zip(rows, token_ids, strict=True):
        if len(ids) > max_prompt_length:
            if filter_overlong_prompts:
                stats.num_too_long += 1
                continue
            if truncation == "error":
                raise DataError(
                    f"{row.where}: prompt has {len(ids)} tokens, more than "
                    f"max_prompt_length={max_prompt_length}; set "
                    "filter_overlong_prompts=True or truncation='left'/'right'"
                )
            ids = ids[-max_prompt_length:] if truncation == "left" else ids[:max_prompt_length]
            stats.num_truncated += 1
        records.append(
            PromptRecord(
                uid=_unique_uid(row, taken_uids),
                prompt_ids=list(ids),
                messages=row.messages,
                ground_truth=row.ground_truth,
                data_source=row.data_source,
                extra_info=row.extra_info,
            )
        )
    stats.num_kept = len(records)

    names = ", ".join(str(p) for p in paths)
    if not records:
        raise DataError(
            f"no prompts left from {names}: {stats.num_rows} rows read, "
            f"{stats.num_duplicates} dropped as duplicates, {stats.num_too_long} "
            f"dropped as longer than max_prompt_length={max_prompt_length} tokens"
        )
    logger.info(
        "loaded %d prompts from %s (%d rows, %d duplicates dropped, %d over %d tokens dropped, %d truncated)",
        stats.num_kept,
        names,
        stats.num_rows,
        stats.num_duplicates,
        stats.num_too_long,
        max_prompt_length,
        stats.num_truncated,
    )
    return PromptDataset(records, stats)


def _as_paths(
    files: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
) -> list[Path]:
    if isinstance(files, (str, os.PathLike)):
        paths = [Path(files)]
    else:
        paths = [Path(f) for f in files]
    if not paths:
        raise ValueError("no data files given")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"prompt data file not found: {path}")
    return paths


def _read_file(path: Path, prompt_key: str, *, plain_text_ok: bool) -> list[_Row]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: cannot be read as parquet: {exc}") from exc
    required = (prompt_key, "reward_model", "data_source")
    missing = [name for name in required if name not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(map(repr, missing))}; found {table.column_names}")
    # Column-wise conversion is much faster than table.to_pylist() on the
    # ~1.8M-row public file.
    prompts = table.column(prompt_key).to_pylist()
    reward_models = table.column("reward_model").to_pylist()
    sources = table.column("data_source").to_pylist()
    if "extra_info" in table.column_names:
        extras = table.column("extra_info").to_pylist()
    else:
        extras = [None] * table.num_rows

    rows = []
    for i in range(table.num_rows):
        where = f"{path}, row {i}"
        rows.append(
            _Row(
                file=path,
                row=i,
                messages=_check_messages(prompts[i], where, prompt_key, plain_text_ok),
                ground_truth=_check_ground_truth(reward_models[i], where),
                data_source=_check_data_source(sources[i], where),
                extra_info=_check_extra_info(extras[i], where),
            )
        )
    return rows


def _check_messages(value: Any, where: str, key: str, plain_text_ok: bool) -> list[dict[str, str]]:
    if isinstance(value, str) and value:
        if not plain_text_ok:
            raise DataError(
                f"{where}: field {key!r} is a plain string; a chat template needs a list of {{role, content}} "
                "messages. For a base model's plain-text prompts set data.apply_chat_template=false"
            )
        # One user turn: the same record a chat-format row gives, so uids and dedup do not depend on the format.
        return [{"role": "user", "content": value}]
    expected = "a non-empty list of {role, content} messages"
    if not isinstance(value, list) or not value:
        shown = "an empty list" if isinstance(value, list) else type(value).__name__
        raise DataError(f"{where}: field {key!r} must be {expected}, got {shown}")
    messages = []
    for j, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(
                f"{where}: field {key!r}[{j}] must be a {{role, content}} dict, got {type(message).__name__}"
            )
        for part in ("role", "content"):
            if not isinstance(message.get(part), str):
                raise DataError(
                    f"{where}: field {key!r}[{j}].{part} must be a string, got {type(message.get(part)).__name__}"
                )
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _check_ground_truth(value: Any, where: str) -> str:
    if not isinstance(value, dict):
        raise DataError(
            f"{where}: field 'reward_model' must be a struct with a 'ground_truth' string, got {type(value).__name__}"
        )
    truth = value.get("ground_truth")
    if truth is None:
        raise DataError(f"{where}: field 'reward_model.ground_truth' is missing")
    if not isinstance(truth, str):
        raise DataError(f"{where}: field 'reward_model.ground_truth' must be a string, got {type(truth).__name__}")
    return truth


def _check_data_source(value: Any, where: str) -> str:
    # The reward function is chosen by data_source, so it cannot be blank.
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: field 'data_source' must be a non-empty string, got {value!r}")
    return value


def _check_extra_info(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DataError(f"{where}: field 'extra_info' must be a struct, got {type(value).__name__}")
    return value


def _prompt_key(messages: list[dict[str, str]]) -> tuple[tuple[str, str], ...]:
    return tuple((m["role"], m["content"]) for m in messages)


def _deduplicate(rows: list[_Row]) -> list[_Row]:
    """Keep the first row of each distinct prompt; disagreeing answers are fatal.

    Two rows with one prompt and two answers mean at least one label is
    wrong, and which one cannot be decided here.
    """
    first: dict[tuple[tuple[str, str], ...], _Row] = {}
    kept = []
    for row in rows:
        key = _prompt_key(row.messages)
        seen = first.get(key)
        if seen is None:
            first[key] = row
            kept.append(row)
        elif seen.ground_truth != row.ground_truth:
            raise DataError(
                f"conflicting duplicates: {seen.where} and {row.where} have the same "
                f"prompt but different ground truths {seen.ground_truth!r} and "
                f"{row.ground_truth!r}"
            )
    return kept


def _encode(rows: list[_Row], tokenizer: PreTrainedTokenizerBase, apply_chat_template: bool) -> list[list[int]]:
    if apply_chat_template:
        # Render to text, then encode without extra special tokens: the
        # template already spells out BOS-like markers where the model wants
        # them, and tokenize=True returns a dict in transformers 5.
        texts = [tokenizer.apply_chat_template(r.messages, tokenize=False, add_generation_prompt=True) for r in rows]
    else:
        texts = ["\n".join(m["content"] for m in r.messages) for r in rows]
    ids: list[list[int]] = []
    for start in range(0, len(texts), _ENCODE_CHUNK):
        chunk = texts[start : start + _ENCODE_CHUNK]
        ids.extend(tokenizer(chunk, add_special_tokens=not apply_chat_template)["input_ids"])
    return ids


def _unique_uid(row: _Row, taken: set[str]) -> str:
    """A uid stable across runs on the same files, and unique in the dataset.

    The source index is preferred because it links back to the original
    row; prompts without one get a content hash. Clashes (two files reusing
    indices, or duplicates kept with dedup=False) get a "#k" suffix in file
    order.
    """
    index = row.extra_info.get("index")
    if index is not None:
        base = f"{row.data_source}:{index}"
    else:
        text = "\x00".join(f"{role}\x01{content}" for role, content in _prompt_key(row.messages))
        base = f"{row.data_source}:{hashlib.sha1(text.encode()).hexdigest()[:16]}"
    uid, k = base, 0
    while uid in taken:
        k += 1
        uid = f"{base}#{k}"
    taken.add(uid)
    return uid
