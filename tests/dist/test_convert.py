"""HF -> Megatron (torch_dist) -> HF conversion: bit-exact round trips through real TP/PP layouts.

Six tiny random models cover every family (Qwen2, Llama, Qwen3), tied and untied
embeddings, GQA and MHA.  Each is converted once (target TP2xPP2 padding), loaded into
TP=2 and PP=2 (2 ranks; all six) and TP2xPP2 (4 ranks; one per family) models whose
logits are compared with HF, saved again from each layout, and exported back to HF;
every tensor must be equal.  mbridge's export of the loaded models is the oracle for ours.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from tests.dist._launch import WORKERS, run_python, run_torchrun
from tests.tiny_models import SHARP, save_tiny, tiny_config

COMMON = dict(max_position_embeddings=256, **SHARP)
GQA = dict(num_attention_heads=4, num_key_value_heads=2)
MHA = dict(num_attention_heads=4, num_key_value_heads=4)


def family_models() -> dict[str, transformers.PretrainedConfig]:
    return {
        "qwen2_untied_gqa": tiny_config("qwen2", **COMMON, **GQA),
        "qwen2_tied_mha": tiny_config("qwen2", **COMMON, **MHA, tie_word_embeddings=True),
        "llama_untied_gqa": tiny_config("llama", **COMMON, **GQA),
        "llama_tied_mha": tiny_config("llama", **COMMON, **MHA, tie_word_embeddings=True),
        "qwen3_tied_gqa": tiny_config("qwen3", **COMMON, **GQA, head_dim=24, tie_word_embeddings=True),
        "qwen3_untied_mha": tiny_config("qwen3", **COMMON, **MHA, tie_word_embeddings=False),
    }


def save_family_model(name: str, out_dir: Path, seed: int, **save_kwargs) -> Path:
    """Seeded and perturbed with ``seed``."""
    return save_tiny(out_dir / name, family_models()[name], seed=seed, perturb_seed=seed, **save_kwargs)


def convert_many(*args: str, timeout: float = 300, script: str = "convert_many.py") -> str:
    return run_python([WORKERS / script, *args], timeout=timeout).stdout


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Every family model saved by transformers and converted once (target TP2xPP2 padding)."""
    root = tmp_path_factory.mktemp("convert")
    names = list(family_models())
    hf = {n: save_family_model(n, root / "hf", i) for i, n in enumerate(names)}
    conv = {n: root / "mcore" / n for n in names}
    out = convert_many("hf-to-mcore", "--tp", "2", "--pp", "2", *[f"{hf[n]}:{conv[n]}" for n in names])
    assert out.count("CONVERTED") == len(names), out
    # the child ran this process's megatron-core: common state where this release keeps it
    from dapo_megatron.checkpoint.torch_dist import common_state_in_dcp

    assert all((conv[n] / "common.pt").is_file() != common_state_in_dcp() for n in names)
    return {n: (hf[n], conv[n]) for n in names}


@pytest.mark.dist
def test_roundtrip_every_family_through_tp2_pp2_tp2xpp2(converted, tmp_path):
    names = list(converted)
    hf = {n: converted[n][0] for n in names}
    conv = {n: converted[n][1] for n in names}
    pairs = [f"{hf[n]}:{conv[n]}" for n in names]
    saved = tmp_path / "saved"
    parity = run_torchrun("convert_worker.py", ["--layouts", "2x1,1x2", "--out-root", saved, *pairs], timeout=400)
    # TP2xPP2 needs 4 ranks on 2 cores: one model per family (tied and untied, GQA and MHA)
    four = ["qwen2_untied_gqa", "llama_tied_mha", "qwen3_tied_gqa"]
    pairs4 = [f"{hf[n]}:{conv[n]}" for n in four]
    parity4 = run_torchrun(
        "convert_worker.py", ["--layouts", "2x2", "--out-root", saved, *pairs4], nproc=4, timeout=400
    ).stdout
    lines = [ln for ln in (parity.stdout + parity4).splitlines() if ln.startswith("PARITY")]
    seen = {(ln.split()[1], ln.split()[2], ln.split()[3]) for ln in lines}
    expected = {(f"tp={t}", f"pp={p}", f"model={n}") for t, p in ((2, 1), (1, 2)) for n in names}
    expected |= {("tp=2", "pp=2", f"model={n}") for n in four}
    assert seen == expected, sorted(expected ^ seen)
    assert all(float(ln.rsplit("=", 1)[1]) < 1e-4 for ln in lines), lines

    jobs = [f"{conv[n]}:{tmp_path / 'back' / n / 'direct'}:{hf[n]}" for n in names]
    for layout, models in (("2x1", names), ("1x2", names), ("2x2", four)):
        jobs += [f"{saved / f'{n}_{layout}'}:{tmp_path / 'back' / n / layout}:{hf[n]}" for n in models]
    out = convert_many("mcore-to-hf", "--max-shard-size", "60KB", *jobs)
    assert out.count("ROUNDTRIP ok") == len(jobs), out
    index = json.loads((tmp_path / "back" / four[0] / "2x2" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1


@pytest.mark.dist
def test_conversion_never_touches_the_gpu(tmp_path):
    """On a host that reports CUDA, both directions build on meta with gloo and never touch the GPU
    (``workers/convert_gpu_host.py`` makes every CUDA entry point raise); the round trip is exact."""
    hf = save_family_model("qwen2_untied_gqa", tmp_path / "hf", 5)
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    out = convert_many("hf-to-mcore", "--tp", "2", f"{hf}:{ckpt}", script="convert_gpu_host.py")
    assert "CONVERTED" in out and "NO_GPU_TOUCHED models=1 backends=['gloo']" in out, out
    out = convert_many("mcore-to-hf", f"{ckpt}:{back}:{hf}", script="convert_gpu_host.py")
    assert "ROUNDTRIP ok" in out and "NO_GPU_TOUCHED models=1 backends=['gloo']" in out, out


@pytest.mark.dist
def test_cli_sharded_input_tokenizer_and_config_from(tmp_path):
    """The CLI end to end: sharded HF input, tokenizer files carried, --hf-config-from, single-file output."""
    from dapo_megatron.data.tokenizer import build_tokenizer

    hf = save_family_model("qwen2_untied_gqa", tmp_path / "hf", 0, max_shard_size="100KB")
    assert (hf / "model.safetensors.index.json").is_file()
    build_tokenizer(["1 + 2 = 3", "4 - 1 = 3"] * 20, hf, vocab_size=300)
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    for argv in (
        ["hf-to-mcore", "--hf-dir", hf, "--out", ckpt, "--tp", "2", "--no-progress"],
        ["mcore-to-hf", "--ckpt", ckpt, "--out", back, "--hf-config-from", hf, "--no-progress"],
    ):
        run_python(["-m", "dapo_megatron.convert", *argv], timeout=300)
    assert (back / "model.safetensors").is_file() and not (back / "model.safetensors.index.json").exists()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (back / name).read_bytes() == (hf / name).read_bytes(), name
    assert (ckpt / "hf" / "tokenizer.json").is_file()
    from dapo_megatron.checkpoint.manifest import read_manifest
    from dapo_megatron.checkpoint.verify import verify_checkpoint

    verification = verify_checkpoint(ckpt, checksums=True)  # a manifest, written last, that matches
    assert verification.verified and verification.intact, verification.reason()
    assert "hf/tokenizer.json" in {f.path for f in read_manifest(ckpt).files}
    from safetensors.torch import load_file

    want = {}
    for fn in sorted(hf.glob("*.safetensors")):
        want.update(load_file(fn))
    got = load_file(back / "model.safetensors")
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    tok = transformers.AutoTokenizer.from_pretrained(back)
    assert tok("1 + 2")["input_ids"]


@pytest.mark.dist
def test_cli_non_float_weights_fail_cleanly(tmp_path):
    """A weight whose dtype cannot be converted: exit code 2 naming file, tensor and dtype; no output left."""
    from safetensors.torch import load_file, save_file

    hf = save_family_model("llama_tied_mha", tmp_path / "hf", 3)
    tensors = load_file(hf / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int32)
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out" / "ckpt"
    proc = run_python(
        ["-m", "dapo_megatron.convert", "hf-to-mcore", "--hf-dir", hf, "--out", out], timeout=300, expect_rc=2
    )
    assert "model.safetensors: tensor model.norm.weight has dtype I32" in proc.stderr, proc.stderr[-5000:]
    assert not out.exists() and list((tmp_path / "out").iterdir()) == []  # no staging directory left


@pytest.mark.dist
def test_export_matches_mbridge_oracle(converted):
    """Our export == mbridge 0.15.1's export of the same loaded model, every tensor, TP=2 and PP=2."""
    pairs = [f"{hf}:{conv}" for hf, conv in converted.values()]
    proc = run_torchrun("convert_mbridge_worker.py", ["--layouts", "2x1,1x2", *pairs], timeout=400)
    ok = [ln for ln in proc.stdout.splitlines() if ln.startswith("MBRIDGE ok")]
    assert len(ok) == 2 * len(pairs), proc.stdout
