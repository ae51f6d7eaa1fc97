"""A model family is one table: a toy family registered here works everywhere with no other edit.

The toy is a Qwen2 without biases whose HF checkpoint spells two tensors its own way (the
final norm and the MLP gate/up), so the names below can only come from its table.
"""

from __future__ import annotations

import dataclasses
import math
import types

import pytest
import torch

from dapo_megatron.actor.model import transformer_config_from_hf
from dapo_megatron.conversion.validation import validate_layout
from dapo_megatron.models import decoder as d
from dapo_megatron.models import divisibility_problems, get_layout, packed_modules
from dapo_megatron.models.mapping import get_mapping
from dapo_megatron.planning.memory import actor_stage_params, model_training_flops
from tests.tiny_models import DEFAULTS

TOY = d.DecoderFamily(
    model_type="toy_decoder",
    architecture="ToyDecoderForCausalLM",
    rows=(
        d.EMBEDDING,
        d.INPUT_NORM,
        d.QKV_WEIGHT,
        d.ATTN_PROJ,
        d.PRE_MLP_NORM,
        dataclasses.replace(d.FC1, hf=("model.layers.{i}.mlp.w1.weight", "model.layers.{i}.mlp.w3.weight")),
        d.FC2,
        dataclasses.replace(d.FINAL_NORM, hf=("model.final_norm.weight",)),
        d.OUTPUT,
    ),
    refuses=(("attention_bias", ""),),
)


@pytest.fixture(autouse=True, scope="module")
def _registered():
    """What the family's own module does at import (``register``), undone for the other tests."""
    d.register(TOY)
    yield
    del d.FAMILIES[TOY.model_type]


def toy_config(**overrides):
    """An HF-style config of the toy family (what ``AutoConfig`` would read from its config.json)."""
    toy = dict(model_type="toy_decoder", architectures=["ToyDecoderForCausalLM"], tie_word_embeddings=False)
    return types.SimpleNamespace(**{**DEFAULTS, **toy, "rope_theta": 1e4, "rms_norm_eps": 1e-6, **overrides})


def test_names_shapes_and_counts_come_from_the_table():
    layout = get_layout(toy_config(), tp=2)
    assert layout.family == "toy_decoder" and not layout.qkv_bias and not layout.qk_norm
    assert layout.padded_vocab_size == 512
    H, F, V, L = 64, 128, 300, 2  # DEFAULTS: 4 q heads, 2 kv heads of 16
    shapes = layout.hf_shapes()
    assert shapes["model.layers.1.mlp.w1.weight"] == shapes["model.layers.1.mlp.w3.weight"] == (F, H)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (2 * 16, H)
    assert shapes["model.final_norm.weight"] == (H,) and shapes["lm_head.weight"] == (V, H)
    assert not any(n.endswith((".bias", "gate_proj.weight")) or n == "model.norm.weight" for n in shapes)
    layer = (4 + 2 * 2) * 16 * H + H * 4 * 16 + 3 * H * F + 2 * H  # qkv, proj, fc1+fc2, two norms
    assert layout.total_params() == sum(map(math.prod, shapes.values())) == L * layer + H + 2 * V * H
    assert layout.matmul_params() == L * layer + H + V * H
    assert actor_stage_params(layout, 2, 1, 0) == L * (layer - 2 * H) // 2 + L * 2 * H + H + 2 * 512 // 2 * H
    assert model_training_flops(layout, [3]) == 6.0 * layout.matmul_params() * 3 + 3 * 2.0 * L * 4 * 16 * 9
    m = get_mapping(toy_config(), tp=2)
    assert m.hf_names_for("decoder.layers.0.mlp.linear_fc1.weight", layer_offset=1) == [
        "model.layers.1.mlp.w1.weight",
        "model.layers.1.mlp.w3.weight",
    ]
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in m.megatron_names(te_names=True)
    assert set(m.hf_names()) == set(shapes)
    # the engine's packed modules (defaults under vLLM's own packed_modules_mapping) come from the tables
    assert packed_modules() == {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("tp", [1, 2])
def test_round_trip_hf_megatron_hf(tp, tie):
    m = get_mapping(toy_config(tie_word_embeddings=tie), tp=tp)
    g = torch.Generator().manual_seed(0)
    hf = {n: torch.randn(s, generator=g) for n, s in m.layout.hf_shapes().items()}
    assert ("lm_head.weight" in hf) is not tie
    exported = {}
    for start, layers in ((0, range(0, 1)), (1, range(1, 2))):  # two pipeline stages
        names = m.megatron_names(layers=layers, pre_process=start == 0, post_process=start == 1)
        for name in names:
            shards = [m.hf_to_megatron_shard(name, hf.__getitem__, r, tp, layer_offset=start) for r in range(tp)]
            if name == "embedding.word_embeddings.weight":
                assert shards[0].shape == (m.layout.padded_vocab_size // tp, 64)
            exported.update(m.megatron_full_to_hf(name, m.merge_tp_shards(name, shards), layer_offset=start))
    assert exported.keys() == hf.keys()
    assert all(torch.equal(exported[n], hf[n]) for n in hf)


def test_divisibility_and_refusals():
    layout = get_layout(toy_config())
    assert [str(p) for p in divisibility_problems(layout, tp=4, pp=3)] == [
        "num_key_value_heads=2 is not divisible by tp=4",
        "num_hidden_layers=2 is not divisible by pp=3",
    ]
    assert validate_layout(layout, tp=3, pp=1) == [
        "num_attention_heads=4 is not divisible by tp=3",
        "num_key_value_heads=2 is not divisible by tp=3",
        "intermediate_size=128 is not divisible by tp=3",
    ]
    with pytest.raises(ValueError, match="num_key_value_heads=2 is not divisible by tp=4"):
        get_mapping(toy_config(), tp=4).split_for_tp(
            "decoder.layers.0.self_attention.linear_qkv.weight", torch.zeros(128, 64), 0, 4
        )
    with pytest.raises(ValueError, match="unsupported option attention_bias=True"):
        get_layout(toy_config(attention_bias=True))
    with pytest.raises(ValueError, match="unsupported architecture 'OtherForCausalLM'"):
        get_layout(toy_config(architectures=["OtherForCausalLM"]))


def test_actor_config_reads_the_table():
    tc = transformer_config_from_hf(toy_config(), tp=2, pp=1, cpu_init=True, transformer_impl="local")
    assert not tc.add_qkv_bias and not tc.qk_layernorm and tc.num_query_groups == 2 and tc.ffn_hidden_size == 128
    with pytest.raises(ValueError, match="intermediate_size=128 is not divisible by tp=3"):
        transformer_config_from_hf(toy_config(num_attention_heads=6, num_key_value_heads=6), tp=3, pp=1)
