"""Megatron GPTModel loaded from HF safetensors == transformers' model (logits, log-probs).

One torchrun launch (2 ranks, gloo) checks every layout: TP1 (x DP2), TP2, TP2+SP, PP2, for
Qwen2 (untied and tied), Qwen3 (tied, q/k norm, head_dim != hidden/heads) and Llama.
"""

from __future__ import annotations

import re

import pytest
import torch

from tests.dist._launch import WORKERS, run_python, run_torchrun
from tests.tiny_models import tiny_config

LAYOUTS = ["1x1", "2x1", "2x1sp", "1x2"]  # TPxPP (+sequence parallel) on 2 ranks


@pytest.mark.dist
def test_hf_parity_tp1_tp2_pp2(tiny_hf_models):
    proc = run_torchrun(
        "hf_parity_worker.py",
        ["--layouts", ",".join(LAYOUTS), "--check-errors", *tiny_hf_models],
        nproc=2,
        timeout=240,
    )
    lines = [ln for ln in proc.stdout.splitlines() if "PARITY" in ln]
    seen = set()
    for line in lines:
        m = re.search(r"tp=(\d) pp=(\d) sp=(\d) model=(\S+) max_abs_logits=(\S+) max_abs_logprob=(\S+)", line)
        assert m, line
        assert float(m.group(5)) < 1e-4 and float(m.group(6)) < 1e-4, line
        seen.add((f"{m.group(1)}x{m.group(2)}" + ("sp" if m.group(3) == "1" else ""), m.group(4)))
    expected = {(lay, d.rsplit("/", 1)[-1]) for lay in LAYOUTS for d in tiny_hf_models}
    assert seen == expected, (sorted(expected - seen), proc.stdout)
    assert "ERRORS-OK" in proc.stdout, proc.stdout


@pytest.mark.dist
def test_hf_parity_single_process_without_torchrun(tiny_hf_models):
    """init_parallel creates a 1-rank gloo group itself when not under torchrun."""
    proc = run_python([WORKERS / "hf_parity_worker.py", "--layouts", "1x1", tiny_hf_models[0]], timeout=180)
    assert "PARITY tp=1 pp=1 sp=0 model=qwen2_untied" in proc.stdout, proc.stdout


def test_cpu_shims_refuse_with_cuda(monkeypatch):
    from dapo_megatron.compat import megatron_cpu as cpu_shims

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA"):
        cpu_shims.apply_cpu_shims()


def test_transformer_config_from_hf_qwen2():
    from dapo_megatron.actor.model import transformer_config_from_hf

    cfg = tiny_config(rms_norm_eps=1e-5)
    tc = transformer_config_from_hf(cfg, tp=2, pp=1)
    assert tc.num_query_groups == 2 and tc.kv_channels == 16 and tc.ffn_hidden_size == 128
    assert tc.add_qkv_bias and not tc.add_bias_linear and tc.gated_linear_unit
    assert tc.normalization == "RMSNorm" and tc.layernorm_epsilon == 1e-5
    assert tc.hidden_dropout == 0.0 and tc.attention_dropout == 0.0
    assert not tc.qk_layernorm
    with pytest.raises(ValueError, match="rope"):
        bad = tiny_config(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0})
        transformer_config_from_hf(bad, tp=1, pp=1)
    with pytest.raises(ValueError, match="MoE"):
        moe = tiny_config(num_hidden_layers=1)
        moe.num_experts = 8
        transformer_config_from_hf(moe, tp=1, pp=1)
    with pytest.raises(ValueError, match="num_key_value_heads=2 is not divisible by tp=4"):
        transformer_config_from_hf(cfg, tp=4, pp=1)
    with pytest.raises(ValueError, match="sequence_parallel"):
        transformer_config_from_hf(cfg, tp=1, pp=1, sequence_parallel=True)
