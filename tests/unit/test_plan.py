"""Preflight planner: estimates against hand computations, verdicts, suggestions, bad input."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dapo_megatron.config import load_config
from dapo_megatron.plan import EXIT_BAD_INPUT, EXIT_FEASIBLE, EXIT_INFEASIBLE, main
from dapo_megatron.planning.memory import (
    GiB,
    actor_stage_params,
    actor_state_bytes,
    estimate_cost,
    estimate_memory,
    kv_bytes_per_token,
    layer_activation_bytes_per_token,
    load_model_shape,
    logits_bytes,
    training_activation_bytes,
    vllm_budget,
)

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "configs" / "dapo_qwen2.5_32b.yaml")
TINY = str(ROOT / "configs" / "tiny_cpu.yaml")
QWEN32B = str(ROOT / "configs" / "models" / "qwen2.5-32b.json")
TINY_MODEL = str(ROOT / "configs" / "models" / "tiny-qwen2.json")

# Qwen2.5-32B by hand: H=5120, L=64, 40 q heads, 8 kv heads, d=128, F=27648, V=152064, untied, qkv bias.
H, L, NQ, NG, D, F, V = 5120, 64, 40, 8, 128, 27648, 152064
QKV_ROWS = (NQ + 2 * NG) * D  # 7168
LAYER_SHARDED = QKV_ROWS * H + QKV_ROWS + H * NQ * D + 3 * H * F  # 487_595_008
LAYER_REPLICATED = 2 * H  # two RMSNorms
VP8 = 152576  # 152064 padded up to a multiple of 128 * 8 = 1024 (149 x 1024)


@pytest.fixture(scope="module")
def shape32b():
    return load_model_shape(QWEN32B)


def test_32b_model_config_has_the_public_architecture(shape32b):
    raw = json.loads(Path(QWEN32B).read_text())
    assert raw["rope_theta"] == 1e6 and raw["rms_norm_eps"] == 1e-5 and raw["tie_word_embeddings"] is False
    s = shape32b
    assert (s.num_layers, s.hidden_size, s.num_attention_heads, s.num_query_groups) == (L, H, NQ, NG)
    assert (s.head_dim, s.ffn_hidden_size, s.vocab_size, s.qkv_bias) == (D, F, V, True)
    assert LAYER_SHARDED == 487_595_008
    total = L * (LAYER_SHARDED + LAYER_REPLICATED) + H + 2 * V * H
    assert s.total_params() == total == 32_763_876_352  # the published "32.8B"


def test_actor_params_per_rank_tp8_pp2_by_hand(shape32b):
    per_layer = LAYER_SHARDED // 8 + LAYER_REPLICATED  # 60_959_616
    first = 32 * per_layer + VP8 // 8 * H  # embedding shard
    last = 32 * per_layer + VP8 // 8 * H + H  # output layer shard + final norm
    assert actor_stage_params(shape32b, 8, 2, 0) == first == 2_048_356_352
    assert actor_stage_params(shape32b, 8, 2, 1) == last
    # one stage, untied: embedding and output layer both on it
    assert actor_stage_params(shape32b, 8, 1, 0) == 64 * per_layer + 2 * VP8 // 8 * H + H


def test_tied_embeddings_are_counted_once_without_pipeline():
    # tiny: H=64, L=2, 4 q / 2 kv heads of 16, F=128, V=512 (already a multiple of 128 x 2), tied, qkv bias
    tiny = load_model_shape(TINY_MODEL)
    sharded = 128 * 64 + 128 + 64 * 64 + 3 * 64 * 128  # qkv (8 heads x 16 rows) + bias + proj + fc1/fc2
    assert tiny.layer_sharded_params() == sharded == 36992
    assert actor_stage_params(tiny, 2, 1, 0) == 2 * (sharded // 2 + 128) + 512 // 2 * 64 + 64 == 53696
    # PP 2, tied: the last stage keeps its own copy of the (output) embedding
    assert actor_stage_params(tiny, 1, 2, 0) == (sharded + 128) + 512 * 64
    assert actor_stage_params(tiny, 1, 2, 1) == (sharded + 128) + 64 + 512 * 64


def test_actor_state_bytes_bf16_distributed_optimizer():
    n = 2_048_361_472
    st = actor_state_bytes(n, "bfloat16", dp=8, distributed_optimizer=True)
    assert st.weights == 2 * n  # bf16
    assert st.grads == 4 * n  # fp32 main grads
    assert st.optimizer == 12 * n // 8  # fp32 master + Adam m + v, sharded over DP 8
    fp32 = actor_state_bytes(n, "float32", dp=1, distributed_optimizer=False)
    assert fp32.optimizer == 8 * n  # no separate master copy
    assert actor_state_bytes(n, "bfloat16", dp=8, distributed_optimizer=False).optimizer == 12 * n


def test_activation_formula_by_hand(shape32b):
    # TP 8 with sequence parallelism: 8H/8 + (2 x 7168 + 2 x 5120 + 6 x 27648) / 8
    a = 5120 + (2 * 7168 + 2 * 5120 + 6 * 27648) // 8
    assert a == 28928
    assert layer_activation_bytes_per_token(shape32b, 8, True) == a
    assert layer_activation_bytes_per_token(shape32b, 8, False) == 8 * H + a - 5120
    tokens = 45056
    # full recompute, stage 0 of PP 2 holds 2 micro-batches of layer inputs (2H/8 bytes x 32 layers)
    full = training_activation_bytes(
        shape32b, tokens=tokens, tp=8, pp=2, sequence_parallel=True, recompute="full", in_flight=2
    )
    assert full == tokens * (2 * 32 * 2 * H // 8 + a)
    none = training_activation_bytes(
        shape32b, tokens=tokens, tp=8, pp=2, sequence_parallel=True, recompute="none", in_flight=2
    )
    assert none == tokens * 2 * 32 * a  # 83 GB: why the recipe uses full recompute
    with pytest.raises(ValueError, match="actor.recompute"):
        training_activation_bytes(shape32b, tokens=1, tp=1, pp=1, sequence_parallel=False, recompute="x", in_flight=1)


def test_logits_and_kv_cache_by_hand(shape32b):
    assert logits_bytes(shape32b, tokens=45056, tp=8) == 45056 * (VP8 // 8) * 4
    assert kv_bytes_per_token(shape32b, 4, "bfloat16") == 2 * 64 * 8 * 128 * 2 // 4 == 65536
    # rollout TP 16 > 8 KV heads: each GPU keeps one (replicated) KV head
    assert kv_bytes_per_token(shape32b, 16, "bfloat16") == 2 * 64 * 1 * 128 * 2


def test_recipe_memory_plan_on_80gb(shape32b):
    cfg = load_config(RECIPE)
    mem = estimate_memory(cfg, shape32b, world_size=128, gpu_bytes=80 * GiB, reserve_bytes=GiB)
    assert mem.dp == 8 and mem.micro_batch_tokens == 45056
    # 32 prompts x 16 / DP 8 = 64 trajectories of up to 22528 tokens, 2 per 45056-token micro-batch
    assert mem.micro_batches == 32
    n_last = actor_stage_params(shape32b, 8, 2, 1)
    resident = 2 * n_last + 4 * n_last + -(-12 * n_last // 8)
    rollout = mem.phase("rollout")
    assert rollout.total == int(0.8 * 80 * GiB) + GiB  # verl's recipe: params, grads, optimizer offloaded
    sync = mem.phase("weight sync")  # the engine's weights and the actor's, one bucket in flight
    assert set(sync.items) == {"actor weights", "vLLM weights", "sync bucket + gathered tensor", "reserve"}
    # the goal for the recipe: at least 8 GiB free in every phase on 80 GiB
    assert all(80 * GiB - ph.total >= 8 * GiB for ph in mem.phases), [(ph.name, ph.total / GiB) for ph in mem.phases]
    train = mem.phase("train")  # worst stage: the last one (logits) vs the first (2 in flight)
    a = 28928
    first = 2 * 2_048_356_352 + 4 * 2_048_356_352 + -(-12 * 2_048_356_352 // 8) + 45056 * (2 * 32 * 1280 + a) + GiB
    last = resident + 45056 * (32 * 1280 + a) + 45056 * (VP8 // 8) * 4 + GiB
    assert train.total == max(first, last)
    assert mem.sleep_frees == int(0.8 * 80 * GiB)
    v = vllm_budget(cfg, shape32b, 80 * GiB)
    assert v.weights == (shape32b.total_params() - (64 * 2 * H + H)) // 4 * 2 + (64 * 2 * H + H) * 2
    assert v.kv_available == v.budget - v.weights - v.activations - v.cuda_graphs
    assert v.full_length_seqs == v.kv_available // 65536 // 22528


def test_without_offload_the_recipe_rollout_phase_holds_the_whole_actor(shape32b):
    off = ["actor.offload.params=false", "actor.offload.grads=false", "actor.offload.optimizer=false"]
    cfg = load_config(RECIPE, off)
    mem = estimate_memory(cfg, shape32b, world_size=128, gpu_bytes=80 * GiB, reserve_bytes=GiB)
    n_last = actor_stage_params(shape32b, 8, 2, 1)
    resident = 2 * n_last + 4 * n_last + -(-12 * n_last // 8)
    assert mem.phase("rollout").total == resident + int(0.8 * 80 * GiB) + GiB  # 0.69 GiB free
    verify = estimate_memory(
        load_config(RECIPE, ["rollout.weight_sync.verify=true"]),
        shape32b,
        world_size=128,
        gpu_bytes=80 * GiB,
        reserve_bytes=GiB,
    ).phase("verify")
    assert set(verify.items) == {"actor weights", "vLLM budget", "reserve"}


def test_engine_awake_while_training_keeps_its_budget(shape32b):
    cfg = load_config(RECIPE, ["rollout.free_cache_engine=false"])
    mem = estimate_memory(cfg, shape32b, world_size=128, gpu_bytes=80 * GiB, reserve_bytes=GiB)
    assert mem.phase("train").items["vLLM budget"] == int(0.8 * 80 * GiB)
    assert mem.sleep_frees == 0


# The sums below are written for these batch sizes, whatever the demo config uses.
BATCH = ["data.train_batch_size=8", "data.gen_batch_size=16", "actor.ppo_mini_batch_size=4", "rollout.n=8"]


def test_cost_by_hand():
    shape = load_model_shape(TINY_MODEL)
    cfg = load_config(TINY, [*BATCH, "actor.recompute=none"])
    assert shape.tie_word_embeddings  # so the one embedding matrix is the output layer: in P
    p = shape.total_params()
    cost = estimate_cost(
        cfg,
        shape,
        world_size=2,
        mean_prompt_tokens=100,
        mean_response_tokens=20,
        gen_rounds=2,
        peak_tflops=1.0,
        train_mfu=0.5,
        gen_mfu=0.25,
    )
    trajectories = 8 * 8  # train_batch_size x rollout.n
    tokens = trajectories * 120
    attn = trajectories * 2 * 2 * 4 * 16 * 120**2  # 2 L nq d s^2 per sequence (causal forward)
    assert cost.trained_tokens == tokens
    assert cost.train_flops == pytest.approx(6 * p * tokens + 3 * attn)
    assert cost.logprob_flops == pytest.approx(2 * p * tokens + attn)
    generated = 2 * 16 * 8 * 20  # rounds x gen_batch_size x n x mean response
    assert cost.generated_tokens == generated
    assert cost.gen_flops == pytest.approx(generated * (2 * p + 4 * 2 * 4 * 16 * (100 + 10)))
    assert cost.train_seconds == pytest.approx((cost.train_flops + cost.logprob_flops) / (2 * 1e12 * 0.5))
    assert cost.gen_seconds == pytest.approx(cost.gen_flops / (2 * 1e12 * 0.25))
    full = estimate_cost(
        load_config(TINY, [*BATCH, "actor.recompute=full"]),
        shape,
        world_size=2,
        mean_prompt_tokens=100,
        mean_response_tokens=20,
        gen_rounds=2,
        peak_tflops=1.0,
        train_mfu=0.5,
        gen_mfu=0.25,
    )
    assert full.train_flops == pytest.approx(8 * p * tokens + 4 * attn)  # one more forward


# ------------------------------------------------------------------------- CLI
def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_recipe_is_feasible_on_16_nodes_of_8x80gb(capsys):
    rc, out, _ = run(capsys, "--config", RECIPE, "--model-config", QWEN32B, "--nodes", "16", "--gpus-per-node", "8",
                     "--gpu-memory-gb", "80")  # fmt: skip
    assert rc == EXIT_FEASIBLE, out
    assert "verdict: FEASIBLE" in out
    assert "TP8 x PP2 x DP8" in out and "TP4 x 32 replicas" in out
    assert "engine sleep frees 64.00 GiB" in out
    assert "step" in out and "MFU" in out


def test_recipe_is_refused_on_one_node_of_8x24gb_with_a_suggestion(capsys):
    rc, out, _ = run(capsys, "--config", RECIPE, "--model-config", QWEN32B, "--nodes", "1", "--gpus-per-node", "8",
                     "--gpu-memory-gb", "24")  # fmt: skip
    assert rc == EXIT_INFEASIBLE, out
    assert "verdict: INFEASIBLE" in out
    assert "actor.parallel: tensor (8) x pipeline (2) = 16 does not divide the world size 8" in out
    assert "train phase needs" in out  # the rollout phase fits: the actor is offloaded there
    assert "suggestion: --nodes" in out  # no single knob fits a 32B model on 8 x 24 GiB


def test_suggestion_fixes_what_it_claims_to(capsys):
    # no recompute: the first stage would keep 2 micro-batches of full activations (~83 GB)
    rc, out, _ = run(capsys, "--config", RECIPE, "--model-config", QWEN32B, "--gpu-memory-gb", "80",
                     "actor.recompute=none")  # fmt: skip
    assert rc == EXIT_INFEASIBLE
    assert "train phase needs" in out
    suggestions = [line.removeprefix("suggestion: ") for line in out.splitlines() if line.startswith("suggestion: ")]
    assert suggestions and suggestions[0] == "actor.recompute=full"
    for s in suggestions:
        rc, out2, _ = run(capsys, "--config", RECIPE, "--model-config", QWEN32B, "--gpu-memory-gb", "80",
                          "actor.recompute=none", *s.split())  # fmt: skip
        assert rc == EXIT_FEASIBLE, (s, out2)


def test_too_small_kv_cache_is_refused(capsys):
    rc, out, _ = run(capsys, "--config", RECIPE, "--model-config", QWEN32B, "--gpu-memory-gb", "80",
                     "rollout.gpu_memory_utilization=0.22")  # fmt: skip
    assert rc == EXIT_INFEASIBLE
    assert "vLLM KV cache" in out and "refuses to start" in out
    assert "suggestion: rollout.tensor_model_parallel_size=8" in out


def test_tiny_config_on_two_processes(capsys):
    rc, out, _ = run(capsys, "--config", TINY, "--model-config", TINY_MODEL, "--gpu-memory-gb", "16")
    assert rc == EXIT_FEASIBLE, out
    assert "TP2 x PP1 x DP1" in out and "2 GPUs = 2" in out


def test_the_planner_cli_imports_no_torch():
    """The planner runs on a login node in well under a second: no torch, no megatron."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['plan', '--config', {TINY!r}, '--model-config', {TINY_MODEL!r}, '--gpu-memory-gb', '16']\n"
        "try:\n    runpy.run_module('dapo_megatron.plan', run_name='__main__')\n"
        "except SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
        "print(sorted({'torch', 'megatron', 'numpy'} & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["actor.recompute=sometimes"], "actor.recompute"),
        (["actor.no_such_key=1"], "no_such_key"),
        (["--gpu-memory-gb", "0"], "--gpu-memory-gb: must be > 0"),
        (["--nodes", "0"], "--nodes: must be >= 1"),
        (["--mfu", "1.5"], "--mfu: must be in (0, 1]"),
    ],
)
def test_bad_input_exits_2_naming_the_problem(capsys, argv, message):
    base = ["--config", RECIPE, "--model-config", QWEN32B]
    if "--gpu-memory-gb" not in argv:
        base += ["--gpu-memory-gb", "80"]
    rc, _, err = run(capsys, *base, *argv)
    assert rc == EXIT_BAD_INPUT
    assert message in err


def test_bad_model_config_exits_2(capsys, tmp_path):
    rc, _, err = run(capsys, "--config", RECIPE, "--gpu-memory-gb", "80")  # actor.model_path has no config.json
    assert rc == EXIT_BAD_INPUT
    assert "models/Qwen2.5-32B/config.json" in err and "--model-config" in err
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    rc, _, err = run(capsys, "--config", RECIPE, "--gpu-memory-gb", "80", "--model-config", str(bad))
    assert rc == EXIT_BAD_INPUT and "not valid JSON" in err
    moe = json.loads(Path(QWEN32B).read_text()) | {"num_experts": 64}
    bad.write_text(json.dumps(moe))
    rc, _, err = run(capsys, "--config", RECIPE, "--gpu-memory-gb", "80", "--model-config", str(tmp_path))
    assert rc == EXIT_BAD_INPUT and "num_experts=64" in err
    partial = {k: v for k, v in moe.items() if k != "hidden_size"}
    bad.write_text(json.dumps(partial))
    rc, _, err = run(capsys, "--config", RECIPE, "--gpu-memory-gb", "80", "--model-config", str(bad))
    assert rc == EXIT_BAD_INPUT and "missing field(s) hidden_size" in err


def test_missing_config_file_exits_2(capsys, tmp_path):
    rc, _, err = run(capsys, "--config", str(tmp_path / "nope.yaml"), "--gpu-memory-gb", "80")
    assert rc == EXIT_BAD_INPUT and "config file not found" in err


def test_model_shape_incompatible_with_layout_is_infeasible(capsys):
    # 40 heads / TP 16 and 64 layers / PP 3 do not divide
    rc, out, _ = run(capsys, "--config", RECIPE, "--model-config", QWEN32B, "--gpu-memory-gb", "80", "--nodes", "24",
                     "actor.parallel.pipeline_model_parallel_size=3")  # fmt: skip
    assert rc == EXIT_INFEASIBLE
    assert "actor.parallel.pipeline_model_parallel_size: 3 does not divide the model's 64 layers" in out


def test_model_training_flops_by_hand():
    from dapo_megatron.planning.memory import ModelShape, model_training_flops

    shape = ModelShape(
        num_layers=2,
        hidden_size=8,
        num_attention_heads=2,
        num_query_groups=1,
        head_dim=4,
        ffn_hidden_size=16,
        vocab_size=10,
        padded_vocab_size=128,
        tie_word_embeddings=True,
    )
    # params: layer = qkv (2+2)*4*8=128 + proj 8*8=64 + 3*8*16=384 -> 576, norms 16 -> 592;
    # 2 layers 1184 + final norm 8 + tied embedding 80 = 1272.
    assert shape.total_params() == 1272
    # attention forward for s=3: 2 * L * nq * d * s^2 = 2*2*2*4*9 = 288
    want = 2 * (6 * 1272 * 3 + 3 * 288) + (6 * 1272 * 5 + 3 * (2 * 2 * 2 * 4 * 25))
    assert model_training_flops(shape, [3, 5], epochs=1) + model_training_flops(shape, [3], epochs=1) == want
    assert model_training_flops(shape, [3, 5], epochs=2) == 2 * model_training_flops(shape, [3, 5])
    # untied: a second [V, H] matrix, but the input embedding is a lookup, so no more FLOPs
    untied = dataclasses.replace(shape, tie_word_embeddings=False)
    assert untied.total_params() == 1272 + 80
    assert model_training_flops(untied, [3, 5]) == model_training_flops(shape, [3, 5])


def test_config_problems_are_taken_from_the_error_not_its_text(monkeypatch, shape32b):
    """The planner lists ConfigError.problems as they are, a message spanning lines included."""
    from dapo_megatron.config import ConfigError, Problem
    from dapo_megatron.planning import feasibility as plan

    def refuse(cfg, **_):
        raise ConfigError.of([Problem("rollout.n", "first line\n  - second line"), Problem("data.truncation", "x")])

    monkeypatch.setattr(plan, "validate", refuse)
    cfg = load_config(RECIPE)
    problems = plan._layout_problems(cfg, shape32b, plan.Cluster(16, 8, 80.0))
    assert problems == ["rollout.n: first line\n  - second line", "data.truncation: x"]
