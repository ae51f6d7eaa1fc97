"""A tiny BPE tokenizer trained offline for CPU-sized experiments.

Why train one instead of using a published tokenizer: the test machines have
no model hub, and a 150k vocabulary would dominate the parameter count of a
tiny model (embedding + output layer). Design choices:

* Byte-level alphabet, no normalizer: decode(encode(x)) == x for any text,
  so the reward sees exactly what the model wrote.
* Every digit is its own pre-token: numbers are spelled digit by digit,
  which keeps arithmetic learnable (a token "68" would hide its digits).
* By default merges may span spaces: the fixed DAPO instruction that wraps
  every problem then shrinks to a few tokens, keeping prompts short.
* Qwen2-style special tokens and chat template, so the code paths used for
  real Qwen models (eos = <|im_end|>, pad = <|endoftext|>) are the ones
  exercised on CPU.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)

# Jinja source of the chat template stored with the tokenizer; render_chat
# below is the same format in Python (a test keeps the two in agreement).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{{- message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_SPECIAL_SPLIT = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


def render_chat(messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True) -> str:
    """Render messages as CHAT_TEMPLATE does, without needing a tokenizer.

    Used to produce training text for the tokenizer before it exists.
    """
    parts = [f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages]
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)


def _segments(texts: Iterable[str]) -> Iterator[str]:
    # The BPE trainer does not split out special tokens, and would learn
    # merges through "<|im_start|>". Encoding does split them, so training
    # sees only the text between them, as encoding will.
    for text in texts:
        for piece in _SPECIAL_SPLIT.split(text):
            if piece:
                yield piece


def build_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike[str],
    *,
    vocab_size: int = 512,
    split_words: bool = False,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and save it loadable by HF and vLLM.

    ``texts`` may contain the special tokens (e.g. fully rendered chats).
    ``vocab_size`` counts the 256 byte symbols and the special tokens; the
    result can be smaller when the texts offer fewer merges.
    ``split_words=True`` pre-splits at word boundaries (GPT-2 style) so no
    token spans two words: more general, but the prompt template then costs
    one token per word.
    """
    min_size = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be at least {min_size}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split_words),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_segments(texts), trainer=trainer)

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(out)
    # Return what consumers will see: the tokenizer as loaded back from disk.
    return AutoTokenizer.from_pretrained(out)
