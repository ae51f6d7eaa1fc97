"""Megatron GPTModel loaded from HF safetensors == transformers' model (logits, log-probs).

One torchrun launch (2 ranks, gloo) checks every layout: TP1 (x DP2), TP2, TP2+SP, PP2, for
Qwen2 (untied and tied), Qwen3 (tied, q/k norm, head_dim != hidden/heads) and Llama.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
import transformers

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _launch import REPO_ROOT, repo_pythonpath, run_torchrun  # noqa: E402

LAYOUTS = ["1x1", "2x1", "2x1sp", "1x2"]  # TPxPP (+sequence parallel) on 2 ranks


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial norms and biases so a swapped/misplaced tensor cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def make_tiny_hf_models(out_dir) -> list[str]:
    common = dict(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=300,  # padded to 384 (TP1) / 512 (TP2)
        max_position_embeddings=256,
        initializer_range=0.1,  # sharp attention: a RoPE or layout error shows up clearly
        rms_norm_eps=1e-5,
    )
    specs = {
        "qwen2_untied": (
            transformers.Qwen2ForCausalLM,
            transformers.Qwen2Config(
                **common, tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 5000.0}
            ),
        ),
        "qwen2_tied": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**common, tie_word_embeddings=True)),
        "qwen3_tied": (
            transformers.Qwen3ForCausalLM,
            transformers.Qwen3Config(**{**common, "num_hidden_layers": 2}, head_dim=24, tie_word_embeddings=True),
        ),
        "llama_untied": (
            transformers.LlamaForCausalLM,
            transformers.LlamaConfig(**{**common, "num_hidden_layers": 2}, tie_word_embeddings=False),
        ),
    }
    dirs = []
    for i, (name, (cls, cfg)) in enumerate(specs.items()):
        torch.manual_seed(i)
        model = cls(cfg)
        _perturb(model, i)
        path = out_dir / name
        model.save_pretrained(path)  # safetensors
        dirs.append(str(path))
    return dirs


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    return make_tiny_hf_models(tmp_path_factory.mktemp("hf"))


@pytest.mark.dist
def test_hf_parity_tp1_tp2_pp2(hf_dirs):
    proc = run_torchrun(
        "hf_parity_worker.py",
        ["--layouts", ",".join(LAYOUTS), "--check-errors", *hf_dirs],
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
    expected = {(lay, d.rsplit("/", 1)[-1]) for lay in LAYOUTS for d in hf_dirs}
    assert seen == expected, (sorted(expected - seen), proc.stdout)
    assert "ERRORS-OK" in proc.stdout, proc.stdout


@pytest.mark.dist
def test_hf_parity_single_process_without_torchrun(hf_dirs):
    """init_parallel creates a 1-rank gloo group itself when not under torchrun."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=repo_pythonpath(), PYTHONWARNINGS="ignore")
    worker = REPO_ROOT / "tests" / "dist" / "workers" / "hf_parity_worker.py"
    proc = subprocess.run(
        [sys.executable, str(worker), "--layouts", "1x1", hf_dirs[0]],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PARITY tp=1 pp=1 sp=0 model=qwen2_untied" in proc.stdout, proc.stdout


def test_model_modules_do_not_import_cpu_shims():
    """GPU code paths must never import the quarantined CPU shims."""
    code = (
        "import sys\n"
        "import dapo_megatron.actor.parallel, dapo_megatron.actor.model, dapo_megatron.actor.hf_loading\n"
        "import dapo_megatron.actor.checkpoint, dapo_megatron.compat.megatron_optimizer\n"
        "import dapo_megatron.models\n"
        "assert 'dapo_megatron.compat.megatron_cpu' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=REPO_ROOT, check=True, timeout=120)


def test_cpu_shims_refuse_with_cuda(monkeypatch):
    from dapo_megatron.compat import megatron_cpu as cpu_shims

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA"):
        cpu_shims.apply_cpu_shims()


def test_transformer_config_from_hf_qwen2():
    from dapo_megatron.actor.model import transformer_config_from_hf

    cfg = transformers.Qwen2Config(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=300,
        rms_norm_eps=1e-5,
    )
    tc = transformer_config_from_hf(cfg, tp=2, pp=1)
    assert tc.num_query_groups == 2 and tc.kv_channels == 16 and tc.ffn_hidden_size == 128
    assert tc.add_qkv_bias and not tc.add_bias_linear and tc.gated_linear_unit
    assert tc.normalization == "RMSNorm" and tc.layernorm_epsilon == 1e-5
    assert tc.hidden_dropout == 0.0 and tc.attention_dropout == 0.0
    assert not tc.qk_layernorm
    with pytest.raises(ValueError, match="rope"):
        bad = transformers.Qwen2Config(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0})
        transformer_config_from_hf(bad, tp=1, pp=1)
    with pytest.raises(ValueError, match="MoE"):
        moe = transformers.Qwen2Config(num_hidden_layers=1)
        moe.num_experts = 8
        transformer_config_from_hf(moe, tp=1, pp=1)
    with pytest.raises(ValueError, match="num_key_value_heads=2 is not divisible by tp=4"):
        transformer_config_from_hf(cfg, tp=4, pp=1)
    with pytest.raises(ValueError, match="sequence_parallel"):
        transformer_config_from_hf(cfg, tp=1, pp=1, sequence_parallel=True)
