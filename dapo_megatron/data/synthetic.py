"""An offline arithmetic task in the DAPO-Math parquet schema.

Why: the whole pipeline (loader, rollout, math_dapo reward, dynamic sampling,
training) must run end to end on a CPU without downloads. Arithmetic has
exact answers checked by the same "Answer: ..." rule as DAPO-Math, and its
difficulty is easy to dial: operand lengths are mixed (by default 1 to 3
digits, with carries, borrows and negative results) so a tiny model learns
some problems but not all, which is exactly when DAPO's dynamic sampling has
groups with non-zero reward variance to keep.

Each row also carries a one-line reference solution (``extra_info.solution``)
for a supervised warm-up, and the tokenizer is trained on the same text.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from transformers import AutoTokenizer

from dapo_megatron.data.records import DAPO_PROMPT_TEMPLATE
from dapo_megatron.data.tokenizer import IM_END, build_tokenizer, render_chat

DATA_SOURCE = "synthetic_arith"
REWARD_STYLE = "rule-lighteval/MATH_v2"
SUPPORTED_OPS = ("+", "-", "*")

_SCHEMA = pa.schema(
    [
        ("data_source", pa.string()),
        (
            "prompt",
            pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])),
        ),
        ("ability", pa.string()),
        (
            "reward_model",
            pa.struct([("ground_truth", pa.string()), ("style", pa.string())]),
        ),
        (
            "extra_info",
            pa.struct(
                [
                    ("index", pa.int64()),
                    ("split", pa.string()),
                    ("problem", pa.string()),
                    ("solution", pa.string()),
                    ("num_digits", pa.int64()),
                ]
            ),
        ),
    ]
)


@dataclass(frozen=True)
class TaskPaths:
    """Where make_arithmetic_task wrote the task."""

    train: Path
    val: Path
    tokenizer_dir: Path


@dataclass(frozen=True)
class _Problem:
    a: int
    op: str
    b: int

    @property
    def answer(self) -> int:
        if self.op == "+":
            return self.a + self.b
        if self.op == "-":
            return self.a - self.b
        return self.a * self.b

    @property
    def question(self) -> str:
        return f"What is {self.a} {self.op} {self.b}?"

    @property
    def solution(self) -> str:
        return f"{self.a} {self.op} {self.b} = {self.answer}\nAnswer: {self.answer}"

    @property
    def num_digits(self) -> int:
        return max(len(str(self.a)), len(str(self.b)))


def _operand_count(num_digits: int) -> int:
    return 10 if num_digits == 1 else 9 * 10 ** (num_digits - 1)


def _sample_problems(count: int, digits: tuple[int, int], ops: Sequence[str], rng: random.Random) -> list[_Problem]:
    """Distinct problems whose difficulty level is uniform over the digit range.

    The level is the longer operand's length; the shorter one is drawn from
    [min, level]. Drawing lengths first (rather than values in [0, 10**max))
    keeps easy short problems frequent enough to be learnable at all; the
    only 1-digit problems number 100 per operator, so that level saturates.
    """
    lo, hi = digits
    operands = sum(_operand_count(d) for d in range(lo, hi + 1))
    space = len(ops) * operands * operands
    if count > space:
        raise ValueError(
            f"asked for {count} distinct problems but digits={digits}, ops={tuple(ops)} allow only {space}"
        )
    seen: set[_Problem] = set()
    problems: list[_Problem] = []
    attempts, max_attempts = 0, 50 * count + 1000
    while len(problems) < count:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(
                f"could not draw {count} distinct problems from digits={digits}, "
                f"ops={tuple(ops)}; widen the digit range"
            )
        level = rng.randint(lo, hi)
        a_digits, b_digits = level, rng.randint(lo, level)
        if rng.random() < 0.5:
            a_digits, b_digits = b_digits, a_digits
        a = rng.randint(0 if a_digits == 1 else 10 ** (a_digits - 1), 10**a_digits - 1)
        b = rng.randint(0 if b_digits == 1 else 10 ** (b_digits - 1), 10**b_digits - 1)
        problem = _Problem(a, rng.choice(ops), b)
        if problem not in seen:
            seen.add(problem)
            problems.append(problem)
    return problems


def _messages(problem: _Problem) -> list[dict[str, str]]:
    return [
        {
            "role": "user",
            "content": DAPO_PROMPT_TEMPLATE.format(problem=problem.question),
        }
    ]


def _write_split(path: Path, problems: list[_Problem], split: str) -> None:
    rows = [
        {
            "data_source": DATA_SOURCE,
            "prompt": _messages(p),
            "ability": "MATH",
            "reward_model": {"ground_truth": str(p.answer), "style": REWARD_STYLE},
            "extra_info": {
                "index": i,
                "split": split,
                "problem": p.question,
                "solution": p.solution,
                "num_digits": p.num_digits,
            },
        }
        for i, p in enumerate(problems)
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=_SCHEMA), path)


def make_arithmetic_task(
    out_dir: str | os.PathLike[str],
    *,
    num_train: int = 2000,
    num_val: int = 200,
    digits: tuple[int, int] = (1, 3),
    ops: Sequence[str] = ("+", "-"),
    seed: int = 0,
    vocab_size: int = 512,
) -> TaskPaths:
    """Write train.parquet, val.parquet and a tokenizer; same seed, same bytes.

    ``digits`` is the inclusive range of operand lengths. Validation problems
    never occur in the training split, so validation measures generalisation
    rather than memorisation. The tokenizer is trained on the training
    conversations only (prompt, solution and <|im_end|>).
    """
    lo, hi = digits
    if not 1 <= lo <= hi:
        raise ValueError(f"digits must be (min, max) with 1 <= min <= max, got {digits}")
    unknown = [op for op in ops if op not in SUPPORTED_OPS]
    if not ops or unknown:
        raise ValueError(f"ops must be a non-empty subset of {SUPPORTED_OPS}, got {tuple(ops)}")
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be >= 1, got {num_train}, {num_val}")

    rng = random.Random(seed)
    problems = _sample_problems(num_train + num_val, (lo, hi), tuple(ops), rng)
    train, val = problems[:num_train], problems[num_train:]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = TaskPaths(out / "train.parquet", out / "val.parquet", out / "tokenizer")
    _write_split(paths.train, train, "train")
    _write_split(paths.val, val, "val")
    texts = [render_chat(_messages(p)) + p.solution + IM_END for p in train]
    build_tokenizer(texts, paths.tokenizer_dir, vocab_size=vocab_size)
    return paths


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dapo-make-task",
        description="Write an offline arithmetic task in the DAPO-Math parquet schema, and its tokenizer.",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--min-digits", type=int, default=1, help="shortest operand length")
    parser.add_argument("--max-digits", type=int, default=3, help="longest operand length")
    parser.add_argument(
        "--ops",
        default="+-",
        help=f"operators to use, e.g. '+-' (any of {''.join(SUPPORTED_OPS)})",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=512)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``dapo-make-task``; prints paths and token lengths."""
    args = _parse_args(argv)
    paths = make_arithmetic_task(
        args.out,
        num_train=args.num_train,
        num_val=args.num_val,
        digits=(args.min_digits, args.max_digits),
        ops=tuple(dict.fromkeys(args.ops.replace(",", "").replace(" ", ""))),
        seed=args.seed,
        vocab_size=args.vocab_size,
    )
    tokenizer = AutoTokenizer.from_pretrained(paths.tokenizer_dir)
    table = pq.read_table(paths.train, columns=["prompt", "extra_info"])
    prompts = [
        tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
        for m in table.column("prompt").to_pylist()
    ]
    solutions = [e["solution"] + IM_END for e in table.column("extra_info").to_pylist()]
    prompt_lens = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    answer_lens = [len(ids) for ids in tokenizer(solutions, add_special_tokens=False)["input_ids"]]
    print(f"train: {paths.train} ({args.num_train} rows)")
    print(f"val: {paths.val} ({args.num_val} rows)")
    print(f"tokenizer: {paths.tokenizer_dir} (vocab {len(tokenizer)})")
    for name, lens in (("prompt", prompt_lens), ("solution+eos", answer_lens)):
        mean = statistics.fmean(lens)
        print(f"{name} tokens: min {min(lens)} mean {mean:.1f} max {max(lens)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
