"""Vocab-parallel log-probs/entropy at TP=2 (torchrun, gloo) == naive full-vocab reference.

One launch runs all checks (synthetic shards + a tiny Qwen2 model vs HF transformers); see
tests/dist/workers/logprobs_worker.py.
"""

from __future__ import annotations

import pytest

from tests.dist._launch import run_torchrun
from tests.tiny_models import save_tiny, tiny_config

SYNTHETIC = ["pad300of384_T1", "pad300of384_T0.7_chunked", "nopad384_T1.3", "rank1_all_padding", "no_entropy"]
MODEL = ["model_T1.0", "model_T0.6"]


@pytest.fixture(scope="module")
def tiny_qwen2_dir(tmp_path_factory) -> str:
    # vocab 300, padded to 512 at TP=2 -> rank 1 holds 44 real + 212 padded rows
    cfg = tiny_config(max_position_embeddings=128, initializer_range=0.1, tie_word_embeddings=False)
    return str(save_tiny(tmp_path_factory.mktemp("hf") / "qwen2", cfg, seed=0))


@pytest.mark.dist
def test_logprobs_tp2(tiny_qwen2_dir):
    proc = run_torchrun("logprobs_worker.py", [tiny_qwen2_dir], nproc=2, timeout=240)
    ok = {(ln.split()[1], ln.split()[2]) for ln in proc.stdout.splitlines() if ln.startswith("LOGPROBS-OK")}
    expected = {(name, f"rank={r}") for name in SYNTHETIC + MODEL for r in (0, 1)}
    assert ok == expected, (sorted(expected ^ ok), proc.stdout)
