"""HF <-> Megatron mapping round trips, in-process (no torch.distributed)."""

from __future__ import annotations

import pytest
import torch
import transformers

from dapo_megatron.models import pad_vocab_size, read_rope_theta
from dapo_megatron.models.mapping import get_mapping
from tests.tiny_models import tiny_config


def _qwen2_config(tie: bool = False, **kw):
    return tiny_config(**{"num_hidden_layers": 3, "tie_word_embeddings": tie, **kw})


def _random_hf_state(model_cls, cfg, seed=0):
    torch.manual_seed(seed)
    model = model_cls(cfg)
    # random values everywhere (norms included) so a permutation error cannot hide
    return {k: torch.randn_like(v) for k, v in model.state_dict().items()}


def _roundtrip(mapping, hf_state, tp_size, layers_per_stage):
    """HF -> per-(pp stage, tp rank) shards -> merged -> HF; returns exported dict."""
    get = hf_state.__getitem__
    exported = {}
    num_layers = mapping.layout.num_layers
    starts = list(range(0, num_layers, layers_per_stage))
    for s, start in enumerate(starts):
        layers = range(start, min(start + layers_per_stage, num_layers))
        names = mapping.megatron_names(layers=layers, pre_process=s == 0, post_process=s == len(starts) - 1)
        for name in names:
            shards = [mapping.hf_to_megatron_shard(name, get, r, tp_size, layer_offset=start) for r in range(tp_size)]
            full = mapping.merge_tp_shards(name, shards)
            for hf_name, t in mapping.megatron_full_to_hf(name, full, layer_offset=start):
                assert hf_name not in exported, hf_name
                exported[hf_name] = t
    return exported


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("tp,layers_per_stage", [(1, 3), (2, 3), (2, 2), (1, 1)])
def test_qwen2_roundtrip_bit_exact(tie, tp, layers_per_stage):
    cfg = _qwen2_config(tie)
    hf_state = _random_hf_state(transformers.Qwen2ForCausalLM, cfg)
    mapping = get_mapping(cfg, tp=tp)
    exported = _roundtrip(mapping, hf_state, tp, layers_per_stage)
    expected = {k for k in hf_state if not (tie and k == "lm_head.weight")}
    assert set(exported) == expected
    assert set(mapping.hf_names()) == expected
    for k in expected:
        assert exported[k].shape == hf_state[k].shape, k
        assert torch.equal(exported[k], hf_state[k]), k


def test_qwen2_tp2_shard_layout():
    """Each rank gets whole KV groups [q.., k, v] and [gate_r; up_r]; vocab is padded."""
    cfg = _qwen2_config()
    hf = _random_hf_state(transformers.Qwen2ForCausalLM, cfg)
    m = get_mapping(cfg, tp=2)
    d, hpg = 16, 2
    get = hf.__getitem__
    for r in range(2):
        qkv = m.hf_to_megatron_shard("decoder.layers.1.self_attention.linear_qkv.weight", get, r, 2)
        p = "model.layers.1.self_attn."
        # rank r owns KV group r: q heads 2r, 2r+1 then k head r then v head r
        exp = torch.cat(
            [
                hf[p + "q_proj.weight"][r * hpg * d : (r + 1) * hpg * d],
                hf[p + "k_proj.weight"][r * d : (r + 1) * d],
                hf[p + "v_proj.weight"][r * d : (r + 1) * d],
            ]
        )
        assert torch.equal(qkv, exp)
        bias = m.hf_to_megatron_shard("decoder.layers.1.self_attention.linear_qkv.bias", get, r, 2)
        exp_b = torch.cat(
            [
                hf[p + "q_proj.bias"][r * hpg * d : (r + 1) * hpg * d],
                hf[p + "k_proj.bias"][r * d : (r + 1) * d],
                hf[p + "v_proj.bias"][r * d : (r + 1) * d],
            ]
        )
        assert torch.equal(bias, exp_b)
        fc1 = m.hf_to_megatron_shard("decoder.layers.0.mlp.linear_fc1.weight", get, r, 2)
        g, u = hf["model.layers.0.mlp.gate_proj.weight"], hf["model.layers.0.mlp.up_proj.weight"]
        assert torch.equal(fc1, torch.cat([g[r * 64 : (r + 1) * 64], u[r * 64 : (r + 1) * 64]]))
        proj = m.hf_to_megatron_shard("decoder.layers.0.self_attention.linear_proj.weight", get, r, 2)
        assert torch.equal(proj, hf["model.layers.0.self_attn.o_proj.weight"][:, r * 32 : (r + 1) * 32])
        fc2 = m.hf_to_megatron_shard("decoder.layers.0.mlp.linear_fc2.weight", get, r, 2)
        assert torch.equal(fc2, hf["model.layers.0.mlp.down_proj.weight"][:, r * 64 : (r + 1) * 64])
    emb = [m.hf_to_megatron_shard("embedding.word_embeddings.weight", get, r, 2) for r in range(2)]
    assert m.layout.padded_vocab_size == 512
    assert emb[0].shape == (256, 64) and emb[1].shape == (256, 64)
    assert torch.equal(emb[1][: 300 - 256], hf["model.embed_tokens.weight"][256:])
    assert torch.count_nonzero(emb[1][300 - 256 :]) == 0
    # layer offset: PP stage starting at global layer 2
    t = m.hf_to_megatron_shard("decoder.layers.0.input_layernorm.weight", get, 0, 2, layer_offset=2)
    assert torch.equal(t, hf["model.layers.2.input_layernorm.weight"])
    # TE-spec spellings map to the same tensors
    t = m.hf_to_megatron_shard("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", get, 1, 2)
    assert torch.equal(t, hf["model.layers.0.post_attention_layernorm.weight"])
    assert m.tp_kind("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight") == "replicated"


def test_tied_output_layer_reads_embedding():
    cfg = _qwen2_config(tie=True)
    hf = _random_hf_state(transformers.Qwen2ForCausalLM, cfg)
    hf.pop("lm_head.weight", None)
    m = get_mapping(cfg, tp=1)
    out = m.hf_to_megatron_shard("output_layer.weight", hf.__getitem__, 0, 1)
    assert torch.equal(out[:300], hf["model.embed_tokens.weight"])
    assert m.megatron_full_to_hf("output_layer.weight", out) == []
    assert "output_layer.weight" not in m.megatron_names()
    assert "output_layer.weight" in m.megatron_names(include_tied_output=True)


@pytest.mark.parametrize("tp", [1, 2])
def test_qwen3_and_llama_roundtrip(tp):
    q3 = tiny_config("qwen3", head_dim=24, intermediate_size=96, vocab_size=260, tie_word_embeddings=True)
    ll = tiny_config("llama", intermediate_size=96, vocab_size=260)
    for cls, cfg in ((transformers.Qwen3ForCausalLM, q3), (transformers.LlamaForCausalLM, ll)):
        hf = _random_hf_state(cls, cfg)
        m = get_mapping(cfg, tp=tp)
        exported = _roundtrip(m, hf, tp, 2)
        expected = {k for k in hf if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
        assert set(exported) == expected
        for k in expected:
            assert torch.equal(exported[k], hf[k]), k


def test_pad_vocab_size():
    assert pad_vocab_size(300, 1) == 384
    assert pad_vocab_size(300, 2) == 512
    assert pad_vocab_size(256, 2) == 256
    assert pad_vocab_size(151936, 4) == 152064


def test_rejections():
    with pytest.raises(ValueError, match="rope"):
        get_mapping(
            _qwen2_config(
                rope_parameters={
                    "rope_type": "yarn",
                    "rope_theta": 1e6,
                    "factor": 4.0,
                    "original_max_position_embeddings": 4096,
                }
            )
        )
    with pytest.raises(ValueError, match="sliding"):
        get_mapping(_qwen2_config(use_sliding_window=True, sliding_window=16, max_window_layers=1))
    with pytest.raises(ValueError, match="hidden_act"):
        get_mapping(_qwen2_config(hidden_act="gelu"))
    with pytest.raises(ValueError, match="attention_bias"):
        get_mapping(tiny_config("llama", attention_bias=True, num_hidden_layers=1))
    with pytest.raises(ValueError, match="model_type"):
        get_mapping(transformers.GPT2Config())
    with pytest.raises(ValueError, match="divisible"):
        m = get_mapping(_qwen2_config(), tp=4)
        m.split_for_tp("decoder.layers.0.self_attention.linear_qkv.weight", torch.zeros(128, 64), 0, 4)
    assert read_rope_theta(_qwen2_config(rope_parameters={"rope_type": "default", "rope_theta": 12345.0})) == 12345.0
