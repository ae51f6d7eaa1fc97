"""Loading DAPO-Math parquet: validation messages, dedup, length handling, uids."""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from dapo_megatron.data.parquet_dataset import (
    DataError,
    PromptDataset,
    load_prompt_dataset,
)
from dapo_megatron.data.records import DAPO_PROMPT_TEMPLATE
from dapo_megatron.data.tokenizer import build_tokenizer, render_chat

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
SCHEMA = pa.schema(
    [
        ("data_source", pa.string()),
        ("prompt", pa.list_(MESSAGE)),
        ("ability", pa.string()),
        (
            "reward_model",
            pa.struct([("ground_truth", pa.string()), ("style", pa.string())]),
        ),
        ("extra_info", pa.struct([("index", pa.int64())])),
    ]
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    texts = [
        render_chat(
            [
                {
                    "role": "user",
                    "content": DAPO_PROMPT_TEMPLATE.format(problem=f"What is {i} + {i}?"),
                }
            ]
        )
        for i in range(100)
    ]
    build_tokenizer(texts, out, vocab_size=400)
    return AutoTokenizer.from_pretrained(out)


def row(problem: str, answer: str = "1", index: int | None = 0, source: str = "math_dapo") -> dict:
    return {
        "data_source": source,
        "prompt": [{"role": "user", "content": DAPO_PROMPT_TEMPLATE.format(problem=problem)}],
        "ability": "MATH",
        "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
        "extra_info": None if index is None else {"index": index},
    }


def write(path, rows, schema=SCHEMA):
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def load(files, tok, **kw):
    kw.setdefault("max_prompt_length", 64)
    return load_prompt_dataset(files, tok, **kw)


def chat_ids(tok, problem: str) -> list[int]:
    text = render_chat([{"role": "user", "content": DAPO_PROMPT_TEMPLATE.format(problem=problem)}])
    return tok(text, add_special_tokens=False)["input_ids"]


def test_loads_records_with_chat_template(tmp_path, tok, caplog):
    path = write(
        tmp_path / "a.parquet",
        [row("What is 1 + 2?", "3", 10), row("What is 5 + 5?", "10", 11)],
    )
    with caplog.at_level(logging.INFO, logger="dapo_megatron.data.parquet_dataset"):
        ds = load(path, tok)
    assert isinstance(ds, PromptDataset) and len(ds) == 2
    first = ds[0]
    assert first.uid == "math_dapo:10"
    assert first.ground_truth == "3"
    assert first.data_source == "math_dapo"
    assert first.extra_info == {"index": 10}
    assert first.messages[0]["role"] == "user"
    assert first.prompt_ids == chat_ids(tok, "What is 1 + 2?")
    assert [r.uid for r in ds] == ["math_dapo:10", "math_dapo:11"]
    assert ds[0:1] == [first]
    assert ds.stats.num_rows == 2 and ds.stats.num_kept == 2
    assert "loaded 2 prompts" in caplog.text


def test_dedup_counts_and_keeps_first(tmp_path, tok):
    rows = [row(f"What is {i % 3} + 1?", str(i % 3 + 1), i) for i in range(10)]
    ds = load(write(tmp_path / "d.parquet", rows), tok)
    assert len(ds) == 3
    assert ds.stats.num_duplicates == 7
    assert [r.uid for r in ds] == ["math_dapo:0", "math_dapo:1", "math_dapo:2"]
    kept_all = load(tmp_path / "d.parquet", tok, dedup=False)
    assert len(kept_all) == 10 and kept_all.stats.num_duplicates == 0


def test_dedup_across_files(tmp_path, tok):
    a = write(tmp_path / "a.parquet", [row("What is 1 + 1?", "2", 0)])
    b = write(
        tmp_path / "b.parquet",
        [row("What is 1 + 1?", "2", 5), row("What is 2 + 2?", "4", 0)],
    )
    ds = load([a, b], tok)
    assert ds.stats.num_duplicates == 1
    # b's index 0 clashes with a's; the uid stays unique.
    assert [r.uid for r in ds] == ["math_dapo:0", "math_dapo:0#1"]


def test_conflicting_duplicates_name_both_rows(tmp_path, tok):
    rows = [
        row("What is 1 + 1?", "2", 0),
        row("What is 3 + 3?", "6", 1),
        row("What is 1 + 1?", "3", 2),
    ]
    path = write(tmp_path / "c.parquet", rows)
    with pytest.raises(DataError, match=r"c\.parquet, row 0 and .*c\.parquet, row 2.*'2' and '3'"):
        load(path, tok)


def test_missing_file(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match=r"nope\.parquet"):
        load(tmp_path / "nope.parquet", tok)


def test_missing_column(tmp_path, tok):
    path = tmp_path / "m.parquet"
    pq.write_table(
        pa.table({"data_source": ["x"], "prompt": [[{"role": "user", "content": "q"}]]}),
        path,
    )
    with pytest.raises(DataError, match=r"m\.parquet: missing column\(s\) 'reward_model'"):
        load(path, tok)


def test_row_missing_ground_truth(tmp_path, tok):
    rows = [row("What is 1 + 1?", "2", 0), row("What is 2 + 2?", "4", 1)]
    rows[1]["reward_model"] = {"style": "rule"}
    path = write(tmp_path / "g.parquet", rows)
    with pytest.raises(
        DataError,
        match=r"g\.parquet, row 1: field 'reward_model.ground_truth' is missing",
    ):
        load(path, tok)


def test_ground_truth_wrong_type(tmp_path, tok):
    schema = SCHEMA.set(3, pa.field("reward_model", pa.struct([("ground_truth", pa.int64())])))
    rows = [row("What is 1 + 1?", 2, 0)]
    rows[0]["reward_model"] = {"ground_truth": 2}
    path = write(tmp_path / "t.parquet", rows, schema)
    with pytest.raises(
        DataError,
        match=r"row 0: field 'reward_model.ground_truth' must be a string, got int",
    ):
        load(path, tok)


def test_prompt_not_a_message_list(tmp_path, tok):
    path = tmp_path / "p.parquet"
    pq.write_table(
        pa.table(
            {
                "data_source": ["math_dapo"],
                "prompt": ["What is 1 + 1?"],
                "reward_model": [{"ground_truth": "2"}],
            }
        ),
        path,
    )
    with pytest.raises(
        DataError,
        match=r"p\.parquet, row 0: field 'prompt' is a plain string.*set data\.apply_chat_template=false",
    ):
        load(path, tok)


def test_empty_prompt_and_bad_message(tmp_path, tok):
    rows = [row("What is 1 + 1?", "2", 0), row("x", "1", 1)]
    rows[1]["prompt"] = []
    with pytest.raises(DataError, match=r"row 1: field 'prompt' must be .*got an empty list"):
        load(write(tmp_path / "e.parquet", rows), tok)
    rows[1]["prompt"] = [{"role": "user", "content": None}]
    with pytest.raises(
        DataError,
        match=r"row 1: field 'prompt'\[0\]\.content must be a string, got NoneType",
    ):
        load(write(tmp_path / "e.parquet", rows), tok)


def test_all_rows_too_long_is_an_error(tmp_path, tok):
    rows = [row(f"What is {i} + {i}?", str(2 * i), i) for i in range(3)] + [row("What is 0 + 0?", "0", 9)]
    path = write(tmp_path / "long.parquet", rows)
    with pytest.raises(
        DataError,
        match=r"no prompts left from .*long\.parquet: 4 rows read, "
        r"1 dropped as duplicates, 3 dropped as longer than max_prompt_length=5",
    ):
        load(path, tok, max_prompt_length=5)


def test_filter_overlong_counts(tmp_path, tok):
    short, long = (
        row("What is 1 + 1?", "2", 0),
        row("What is " + "9" * 40 + " + 1?", "1", 1),
    )
    limit = len(chat_ids(tok, "What is 1 + 1?"))
    ds = load(write(tmp_path / "f.parquet", [short, long]), tok, max_prompt_length=limit)
    assert len(ds) == 1 and ds.stats.num_too_long == 1 and ds.stats.num_truncated == 0


def test_overlong_error_names_row(tmp_path, tok):
    rows = [row("What is 1 + 1?", "2", 0), row("What is " + "9" * 40 + " + 1?", "1", 1)]
    path = write(tmp_path / "o.parquet", rows)
    limit = len(chat_ids(tok, "What is 1 + 1?"))
    with pytest.raises(DataError, match=r"o\.parquet, row 1: prompt has \d+ tokens"):
        load(path, tok, max_prompt_length=limit, filter_overlong_prompts=False)


@pytest.mark.parametrize("side", ["left", "right"])
def test_truncation(tmp_path, tok, side):
    problem = "What is " + "9" * 40 + " + 1?"
    path = write(tmp_path / "tr.parquet", [row(problem, "1", 0), row("What is 1 + 1?", "2", 1)])
    full = chat_ids(tok, problem)
    limit = len(chat_ids(tok, "What is 1 + 1?"))
    ds = load(
        path,
        tok,
        max_prompt_length=limit,
        filter_overlong_prompts=False,
        truncation=side,
    )
    expected = full[-limit:] if side == "left" else full[:limit]
    assert ds[0].prompt_ids == expected
    assert ds[1].prompt_ids == chat_ids(tok, "What is 1 + 1?")
    assert ds.stats.num_truncated == 1 and len(ds) == 2


def test_bad_options(tmp_path, tok):
    path = write(tmp_path / "a.parquet", [row("What is 1 + 1?")])
    with pytest.raises(ValueError, match="truncation must be one of"):
        load(path, tok, truncation="middle")
    with pytest.raises(ValueError, match="max_prompt_length must be positive"):
        load(path, tok, max_prompt_length=0)
    with pytest.raises(ValueError, match="no data files"):
        load([], tok)


def test_uid_without_index_is_a_stable_content_hash(tmp_path, tok):
    rows = [row("What is 1 + 1?", "2", None), row("What is 2 + 2?", "4", None)]
    path = write(tmp_path / "h.parquet", rows)
    first, second = load(path, tok), load(path, tok)
    uids = [r.uid for r in first]
    assert uids == [r.uid for r in second]
    assert len(set(uids)) == 2 and all(u.startswith("math_dapo:") and len(u) == 26 for u in uids)
    duplicates = load(write(tmp_path / "h2.parquet", rows + rows), tok, dedup=False)
    assert len({r.uid for r in duplicates}) == 4


def test_without_chat_template_and_custom_prompt_key(tmp_path, tok):
    rows = [row("What is 1 + 1?", "2", 0)]
    rows[0]["question"] = rows[0].pop("prompt")
    schema = pa.schema([f if f.name != "prompt" else pa.field("question", f.type) for f in SCHEMA])
    path = write(tmp_path / "q.parquet", rows, schema)
    ds = load(path, tok, prompt_key="question", apply_chat_template=False)
    content = DAPO_PROMPT_TEMPLATE.format(problem="What is 1 + 1?")
    assert ds[0].prompt_ids == tok(content)["input_ids"]
    assert ds[0].messages == [{"role": "user", "content": content}]


def test_plain_text_prompts_for_a_base_model_tokenizer(tmp_path, tok):
    """A string prompt column and a tokenizer without a chat template: tokenized as is, special tokens by its rule."""
    import copy

    base = copy.deepcopy(tok)
    base.chat_template = None
    text = "Question: what is 1 + 1?\nAnswer:"
    path = tmp_path / "plain.parquet"
    pq.write_table(
        pa.table({"data_source": ["math_dapo"], "prompt": [text], "reward_model": [{"ground_truth": "2"}]}), path
    )
    with pytest.raises(ValueError, match=r"the tokenizer has no chat template .*set data\.apply_chat_template=false"):
        load(path, base)
    ds = load(path, base, apply_chat_template=False)
    assert ds[0].prompt_ids == base(text)["input_ids"]
    assert ds[0].messages == [{"role": "user", "content": text}]
