"""Conversion input validation: every bad input is a clear error and nothing is written.

These run in-process: validation reads only config.json and safetensors headers, so the
CLI's ``main`` is called directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from dapo_megatron.checkpoint.files import staged_output_dir
from dapo_megatron.checkpoint.hf_reader import (
    SafetensorsError,
    open_hf_safetensors,
    read_safetensors_header,
    scan_hf_safetensors,
)
from dapo_megatron.checkpoint.hf_writer import ShardedSafetensorsWriter, parse_size, plan_shards
from dapo_megatron.checkpoint.metadata import CheckpointMismatchError, write_checkpoint_metadata
from dapo_megatron.conversion.mcore_to_hf import mcore_to_hf
from dapo_megatron.conversion.validation import ConversionError, validate_hf_checkpoint
from dapo_megatron.convert import main
from tests.tiny_models import save_tiny, tiny_config

SMALL = dict(hidden_size=32, intermediate_size=64, vocab_size=200, max_position_embeddings=64)


def _save(path: Path, family: str = "qwen2", **kw) -> Path:
    return save_tiny(path, tiny_config(family, **{**SMALL, **kw}), seed=0)


@pytest.fixture()
def qwen2(tmp_path) -> Path:
    return _save(tmp_path / "qwen2")


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _cli_fails(capsys, argv: list, out: Path, *needles: str) -> str:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    for needle in needles:
        assert needle in err, err
    assert not out.exists(), "output written despite invalid input"
    assert not list(out.parent.glob(f".{out.name}.tmp-*")), "staging directory left behind"
    return err


def test_valid_checkpoint_passes(qwen2):
    ckpt = validate_hf_checkpoint(qwen2, tp=2, pp=2)
    assert ckpt.layout.num_layers == 2 and "model.layers.1.self_attn.q_proj.bias" in ckpt.tensors


def test_wrong_architecture(capsys, tmp_path):
    hf = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)
    ).save_pretrained(hf)
    out = tmp_path / "out"
    _cli_fails(
        capsys, ["hf-to-mcore", "--hf-dir", hf, "--out", out], out, "unsupported architecture", "GPT2LMHeadModel"
    )


def test_indivisible_heads_and_layers_all_reported(capsys, qwen2, tmp_path):
    out = tmp_path / "out"
    _cli_fails(
        capsys,
        ["hf-to-mcore", "--hf-dir", qwen2, "--out", out, "--tp", "3", "--pp", "3"],
        out,
        "num_attention_heads=4 is not divisible by tp=3",
        "num_key_value_heads=2 is not divisible by tp=3",
        "num_hidden_layers=2 is not divisible by pp=3",
    )


def test_truncated_safetensors(capsys, qwen2, tmp_path):
    f = qwen2 / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(SafetensorsError, match="truncated"):
        read_safetensors_header(f)
    out = tmp_path / "out"
    _cli_fails(capsys, ["hf-to-mcore", "--hf-dir", qwen2, "--out", out], out, "truncated", "model.safetensors")


def test_truncated_header(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"\x10\x00")
    with pytest.raises(SafetensorsError, match="no header"):
        read_safetensors_header(f)


def test_missing_shard_named(capsys, tmp_path):
    hf = tmp_path / "sharded"
    save_tiny(hf, tiny_config(**SMALL), seed=0, max_shard_size="20KB")
    shards = sorted(hf.glob("model-*.safetensors"))
    assert len(shards) > 1
    assert len(scan_hf_safetensors(hf)) > 10
    shards[1].unlink()
    out = tmp_path / "out"
    _cli_fails(capsys, ["hf-to-mcore", "--hf-dir", hf, "--out", out], out, shards[1].name, "do not exist")


def test_vocab_mismatch(capsys, qwen2, tmp_path):
    _edit_config(qwen2, vocab_size=256)
    out = tmp_path / "out"
    _cli_fails(
        capsys,
        ["hf-to-mcore", "--hf-dir", qwen2, "--out", out],
        out,
        "vocab_size=256 in config.json but model.embed_tokens.weight has 200 rows",
    )


def test_untied_without_lm_head(tmp_path):
    hf = _save(tmp_path / "tied", tie_word_embeddings=True)
    _edit_config(hf, tie_word_embeddings=False)
    with pytest.raises(
        ConversionError, match="tie_word_embeddings=false in config.json but the checkpoint has no lm_head"
    ):
        validate_hf_checkpoint(hf)


def test_qkv_bias_inconsistent_with_family(tmp_path):
    llama = _save(tmp_path / "llama", "llama")
    _edit_config(llama, architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    with pytest.raises(
        ConversionError, match="Qwen2ForCausalLM expects a qkv bias but model.layers.0.self_attn.q_proj.bias"
    ):
        validate_hf_checkpoint(llama)
    qwen = _save(tmp_path / "qwen")
    _edit_config(qwen, architectures=["LlamaForCausalLM"], model_type="llama")
    with pytest.raises(ConversionError, match="has qkv biases"):
        validate_hf_checkpoint(qwen)


def test_rope_and_eps(tmp_path, qwen2):
    _edit_config(qwen2, rms_norm_eps=-1.0)
    with pytest.raises(ConversionError, match="rms_norm_eps=-1.0"):
        validate_hf_checkpoint(qwen2)
    _edit_config(qwen2, rms_norm_eps=1e-6, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ConversionError, match="rope"):
        validate_hf_checkpoint(qwen2)


def test_shape_mismatch_named(tmp_path, qwen2):
    _edit_config(qwen2, intermediate_size=48)
    with pytest.raises(ConversionError, match="model.layers.0.mlp.gate_proj.weight .* has shape \\(64, 32\\)"):
        validate_hf_checkpoint(qwen2)


def test_output_not_empty_is_refused(capsys, qwen2, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["hf-to-mcore", "--hf-dir", str(qwen2), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_mcore_to_hf_bad_inputs(capsys, qwen2, tmp_path):
    out = tmp_path / "out"
    _cli_fails(capsys, ["mcore-to-hf", "--ckpt", tmp_path / "nope", "--out", out], out, "no checkpoint")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    write_checkpoint_metadata(
        ckpt,
        transformers.AutoConfig.from_pretrained(qwen2),
        step=None,
        tp=1,
        pp=1,
        has_optimizer=False,
        has_extra_state=False,
    )
    other = _save(tmp_path / "other", hidden_size=64)
    _cli_fails(
        capsys,
        ["mcore-to-hf", "--ckpt", ckpt, "--out", out, "--hf-config-from", other],
        out,
        "belongs to another model",
        "hidden_size: checkpoint has 32, model has 64",
    )
    with pytest.raises(CheckpointMismatchError):
        mcore_to_hf(ckpt, out, hf_config_from=other)
    eps = _save(tmp_path / "eps", rms_norm_eps=1e-3)
    _cli_fails(capsys, ["mcore-to-hf", "--ckpt", ckpt, "--out", out, "--hf-config-from", eps], out, "rms_norm_eps")


def test_parse_size_and_plan():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2KiB") == 2048 and parse_size("1000") == 1000
    with pytest.raises(ValueError, match="invalid size"):
        parse_size("lots")
    plan = plan_shards([("a", 40), ("b", 40), ("c", 100), ("d", 10)], 80)
    assert plan == [["a", "b"], ["c"], ["d"]]


def test_writer_and_staging(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with staged_output_dir(out) as stage:
            (stage / "x").write_text("half")
            raise RuntimeError("boom")
    assert not out.exists() and not list(tmp_path.iterdir())
    tensors = {"a": torch.ones(2), "b": torch.arange(3, dtype=torch.bfloat16), "c": torch.zeros(3, 2)}
    specs = {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}
    with staged_output_dir(out) as stage:
        w = ShardedSafetensorsWriter(stage, [["a"], ["b", "c"]], specs)
        w.add("a", tensors["a"])
        w.add("c", tensors["c"])  # out of plan order: written at its planned offset
        assert sorted(p.name for p in stage.iterdir() if not p.name.startswith(".")) == [
            "model-00001-of-00002.safetensors"
        ]  # shard 2 stays a hidden .partial file until b arrives
        with pytest.raises(ValueError, match=r"tensor 'b' is \(2,\) torch.bfloat16, the shard plan says \(3,\)"):
            w.add("b", tensors["b"][:2])
        w.add("b", tensors["b"])
        w.finish()
    assert sorted(p.name for p in out.iterdir()) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    from safetensors.torch import load_file

    got = {**load_file(out / "model-00001-of-00002.safetensors"), **load_file(out / "model-00002-of-00002.safetensors")}
    assert sorted(got) == sorted(tensors)
    assert all(got[k].dtype == t.dtype and torch.equal(got[k], t) for k, t in tensors.items())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {
        "a": "model-00001-of-00002.safetensors",
        "b": "model-00002-of-00002.safetensors",
        "c": "model-00002-of-00002.safetensors",
    }
    assert index["metadata"]["total_size"] == 4 * 2 + 2 * 3 + 4 * 6


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_hf_reader_reopen_reads_the_same_tensors(tmp_path, shard):
    """``reopen=True`` (one file handle per read, used by hf-to-mcore) serves the same tensors."""
    from safetensors.torch import load_file

    path = save_tiny(
        tmp_path / "m", tiny_config(**SMALL), seed=0, **({} if shard is None else {"max_shard_size": shard})
    )
    assert (path / "model.safetensors.index.json").is_file() == (shard is not None)
    want = {}
    for fn in sorted(path.glob("*.safetensors")):
        want.update(load_file(fn))
    with open_hf_safetensors(path, reopen=True) as get:
        assert all(torch.equal(get(name), t) for name, t in want.items())
        with pytest.raises(KeyError, match="has no tensor 'nope'"):
            get("nope")
