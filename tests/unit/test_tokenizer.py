"""The tiny offline tokenizer: exact round trips, digit splitting, chat format."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from dapo_megatron.data.records import DAPO_PROMPT_TEMPLATE
from dapo_megatron.data.tokenizer import (
    IM_END,
    IM_START,
    PAD_TOKEN,
    build_tokenizer,
    render_chat,
)


def _texts(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        prompt = DAPO_PROMPT_TEMPLATE.format(problem=f"What is {a} + {b}?")
        texts.append(
            render_chat([{"role": "user", "content": prompt}]) + f"{a} + {b} = {a + b}\nAnswer: {a + b}{IM_END}"
        )
    return texts


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    build_tokenizer(_texts(), out, vocab_size=512)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return AutoTokenizer.from_pretrained(tok_dir)


def _user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def test_round_trip_on_task_texts(tok):
    for text in _texts(50, seed=1):
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=80))
def test_round_trip_on_arbitrary_text(tok, text):
    # Byte-level BPE without normalizer must reproduce any string exactly.
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_digits_are_single_tokens(tok):
    ids = tok("What is 1234567890 + 42?", add_special_tokens=False)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("123456789042")


def test_special_tokens_and_eos(tok):
    assert tok.eos_token == IM_END
    assert tok.pad_token == PAD_TOKEN
    assert tok.eos_token_id == tok.convert_tokens_to_ids(IM_END)
    assert tok.pad_token_id == tok.convert_tokens_to_ids(PAD_TOKEN)
    assert len({tok.eos_token_id, tok.pad_token_id, tok.convert_tokens_to_ids(IM_START)}) == 3
    ids = tok(f"{IM_START}user\nhi{IM_END}", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids(IM_START)
    assert ids[-1] == tok.eos_token_id
    assert tok.bos_token is None
    assert len(tok) <= 512


def test_chat_template_is_qwen2_style(tok):
    text = tok.apply_chat_template(_user("What is 2 + 2?"), tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "4\nAnswer: 4"},
    ]
    for gen in (True, False):
        rendered = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=gen)
        assert rendered == render_chat(conversation, add_generation_prompt=gen)


def test_fixed_template_compresses_to_few_tokens(tok):
    prompt = DAPO_PROMPT_TEMPLATE.format(problem="What is 23 + 45?")
    text = tok.apply_chat_template(_user(prompt), tokenize=False, add_generation_prompt=True)
    assert len(tok(text, add_special_tokens=False)["input_ids"]) <= 16


def test_build_is_deterministic_and_returns_loaded_tokenizer(tmp_path, tok_dir):
    again = build_tokenizer(_texts(), tmp_path, vocab_size=512)
    assert (tmp_path / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    assert again("12 + 3", add_special_tokens=False)["input_ids"]


def test_split_words_keeps_tokens_inside_words(tmp_path):
    tok = build_tokenizer(_texts(100), tmp_path, vocab_size=400, split_words=True)
    pieces = tok.convert_ids_to_tokens(tok("Solve the following", add_special_tokens=False)["input_ids"])
    assert all("Ġ" not in p[1:] for p in pieces)


def test_vocab_size_too_small(tmp_path):
    with pytest.raises(ValueError, match="vocab_size must be at least 259"):
        build_tokenizer(["abc"], tmp_path, vocab_size=100)


def test_vllm_loads_tokenizer(tok_dir, tok):
    from vllm.tokenizers import get_tokenizer

    vtok = get_tokenizer(str(tok_dir))
    text = tok.apply_chat_template(_user("What is 7 - 9?"), tokenize=False, add_generation_prompt=True)
    assert vtok.encode(text, add_special_tokens=False) == tok(text, add_special_tokens=False)["input_ids"]
    assert vtok.eos_token_id == tok.eos_token_id
