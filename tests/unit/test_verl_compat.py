"""verl's DAPO override blocks load through the real config loader, and every refusal names its key.

The blocks are the override lines of verl's recipe/dapo Megatron scripts with only the paths
changed (and shell variables written out), passed through bash exactly as the scripts pass them,
so Hydra's leading ``+`` and the scripts' quoting reach the loader as they reach verl.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dapo_megatron.config import ConfigError, explain, load_config
from dapo_megatron.verl_compat import TABLE, find_row

ROOT = Path(__file__).resolve().parents[2]

# recipe/dapo/test_dapo_megatron_local.sh (Qwen2.5-Math-7B, Megatron TP4 PP4, main_ppo)
MEGATRON_LOCAL = """
    data.train_files="/data/dapo-math-17k.parquet" \\
    data.val_files="['/data/aime-2024.parquet']" \\
    data.prompt_key=prompt \\
    data.truncation='left' \\
    data.max_prompt_length=2048 \\
    data.max_response_length=8192 \\
    data.train_batch_size=256 \\
    actor_rollout_ref.rollout.n=2 \\
    algorithm.adv_estimator=grpo \\
    algorithm.use_kl_in_reward=False \\
    algorithm.kl_ctrl.kl_coef=0.0 \\
    actor_rollout_ref.actor.use_kl_loss=False \\
    actor_rollout_ref.actor.kl_loss_coef=0.0 \\
    actor_rollout_ref.actor.clip_ratio_low=0.2 \\
    actor_rollout_ref.actor.clip_ratio_high=0.28 \\
    actor_rollout_ref.actor.clip_ratio_c=10.0 \\
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2 \\
    actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4 \\
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4 \\
    actor_rollout_ref.model.path="/models/Qwen2.5-Math-7B" \\
    actor_rollout_ref.model.enable_gradient_checkpointing=True \\
    actor_rollout_ref.actor.optim.lr=1e-6 \\
    actor_rollout_ref.actor.optim.lr_warmup_steps=10 \\
    actor_rollout_ref.actor.optim.weight_decay=0.1 \\
    actor_rollout_ref.actor.ppo_mini_batch_size=16 \\
    actor_rollout_ref.actor.megatron.param_offload=True \\
    actor_rollout_ref.actor.megatron.optimizer_offload=True \\
    actor_rollout_ref.actor.megatron.grad_offload=True \\
    actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=4 \\
    actor_rollout_ref.actor.megatron.tensor_model_parallel_size=4 \\
    actor_rollout_ref.actor.entropy_coeff=0 \\
    actor_rollout_ref.actor.optim.clip_grad=1.0 \\
    actor_rollout_ref.actor.loss_agg_mode=token-mean \\
    actor_rollout_ref.rollout.gpu_memory_utilization=0.80 \\
    actor_rollout_ref.rollout.tensor_model_parallel_size=4 \\
    actor_rollout_ref.rollout.enable_chunked_prefill=True \\
    actor_rollout_ref.rollout.max_num_batched_tokens=$((2048 + 8192)) \\
    actor_rollout_ref.rollout.temperature=1.0 \\
    actor_rollout_ref.rollout.top_p=1.0 \\
    actor_rollout_ref.rollout.top_k="-1" \\
    actor_rollout_ref.rollout.val_kwargs.temperature=1.0 \\
    actor_rollout_ref.rollout.val_kwargs.top_p=0.7 \\
    actor_rollout_ref.rollout.val_kwargs.top_k=-1 \\
    actor_rollout_ref.rollout.val_kwargs.do_sample=True \\
    actor_rollout_ref.rollout.val_kwargs.n=1 \\
    actor_rollout_ref.ref.megatron.pipeline_model_parallel_size=4 \\
    actor_rollout_ref.ref.megatron.tensor_model_parallel_size=4 \\
    actor_rollout_ref.ref.megatron.param_offload=True \\
    reward_model.reward_manager=dapo \\
    +reward_model.reward_kwargs.overlong_buffer_cfg.enable=True \\
    +reward_model.reward_kwargs.overlong_buffer_cfg.len=4096 \\
    +reward_model.reward_kwargs.overlong_buffer_cfg.penalty_factor=1.0 \\
    +reward_model.reward_kwargs.overlong_buffer_cfg.log=False \\
    +reward_model.reward_kwargs.max_resp_len=8192 \\
    trainer.logger=['console','wandb'] \\
    trainer.project_name="DAPO" \\
    trainer.experiment_name="DAPO-Qwen2.5-7b-MATH-megatron" \\
    trainer.n_gpus_per_node=16 \\
    trainer.nnodes="1" \\
    trainer.val_before_train=False \\
    trainer.test_freq=10 \\
    trainer.save_freq=10 \\
    trainer.total_epochs=10 \\
    trainer.default_local_dir="/ckpts/DAPO/DAPO-Qwen2.5-7b-MATH-megatron" \\
    trainer.resume_mode=disable \\
    trainer.log_val_generations=10
"""

# recipe/dapo/test_dapo_8b_megatron_fp16.sh (Qwen3-8B-Base, Megatron TP2), DTYPE as its dtype variable
MEGATRON_8B = """
    data.train_files="/data/dapo-math-17k.parquet" \\
    data.val_files="/data/aime-2024.parquet" \\
    data.prompt_key=prompt \\
    data.return_raw_chat=True \\
    data.truncation='left' \\
    actor_rollout_ref.rollout.name=vllm \\
    actor_rollout_ref.rollout.mode=async \\
    actor_rollout_ref.rollout.dtype=DTYPE \\
    actor_rollout_ref.actor.megatron.dtype=DTYPE \\
    data.max_prompt_length=2048 \\
    data.max_response_length=8192 \\
    data.train_batch_size=32 \\
    actor_rollout_ref.rollout.n=16 \\
    algorithm.adv_estimator=grpo \\
    algorithm.use_kl_in_reward=False \\
    algorithm.kl_ctrl.kl_coef=0.0 \\
    actor_rollout_ref.model.use_fused_kernels=True \\
    actor_rollout_ref.actor.use_kl_loss=False \\
    actor_rollout_ref.actor.kl_loss_coef=0.0 \\
    actor_rollout_ref.actor.clip_ratio_low=0.2 \\
    actor_rollout_ref.actor.clip_ratio_high=0.28 \\
    actor_rollout_ref.actor.clip_ratio_c=10.0 \\
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2 \\
    actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4 \\
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4 \\
    actor_rollout_ref.actor.use_dynamic_bsz=True \\
    actor_rollout_ref.ref.log_prob_use_dynamic_bsz=True \\
    actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True \\
    actor_rollout_ref.actor.ppo_max_token_len_per_gpu=10240 \\
    actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=10240 \\
    actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=10240 \\
    actor_rollout_ref.model.path="/models/Qwen3-8B-Base" \\
    actor_rollout_ref.actor.optim.lr=1e-6 \\
    actor_rollout_ref.actor.optim.lr_warmup_steps=10 \\
    actor_rollout_ref.actor.optim.weight_decay=0.1 \\
    actor_rollout_ref.actor.ppo_mini_batch_size=32 \\
    actor_rollout_ref.actor.megatron.param_offload=True \\
    actor_rollout_ref.actor.megatron.optimizer_offload=True \\
    actor_rollout_ref.actor.megatron.grad_offload=True \\
    actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=1 \\
    actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2 \\
    actor_rollout_ref.actor.entropy_coeff=0 \\
    actor_rollout_ref.actor.optim.clip_grad=1.0 \\
    actor_rollout_ref.actor.loss_agg_mode=token-mean \\
    actor_rollout_ref.rollout.gpu_memory_utilization=0.80 \\
    actor_rollout_ref.rollout.tensor_model_parallel_size=1 \\
    actor_rollout_ref.rollout.enable_chunked_prefill=True \\
    actor_rollout_ref.rollout.max_num_batched_tokens=$((2048 + 8192)) \\
    actor_rollout_ref.rollout.temperature=1.0 \\
    actor_rollout_ref.rollout.top_p=1.0 \\
    actor_rollout_ref.rollout.top_k=-1 \\
    actor_rollout_ref.rollout.val_kwargs.temperature=1.0 \\
    actor_rollout_ref.rollout.val_kwargs.top_p=0.7 \\
    actor_rollout_ref.rollout.val_kwargs.top_k=-1 \\
    actor_rollout_ref.rollout.val_kwargs.do_sample=True \\
    actor_rollout_ref.rollout.val_kwargs.n=1 \\
    actor_rollout_ref.rollout.calculate_log_probs=True \\
    +actor_rollout_ref.actor.megatron.override_transformer_config.apply_rope_fusion=True \\
    reward_model.reward_manager=dapo \\
    trainer.logger=['console','wandb'] \\
    trainer.project_name="DAPO-fp16" \\
    trainer.experiment_name="fp16" \\
    trainer.n_gpus_per_node=8 \\
    trainer.nnodes="1" \\
    trainer.val_before_train=False \\
    trainer.test_freq=10 \\
    trainer.save_freq=-1 \\
    trainer.total_epochs=10 \\
    trainer.default_local_dir="/ckpts/DAPO-fp16/fp16" \\
    trainer.resume_mode=auto \\
    trainer.log_val_generations=10
"""

# recipe/dapo/test_dapo_8b_megatron_fp8train.sh: its FP8 array (the rest is MEGATRON_8B's, plus use_mbridge)
FP8 = """
    +actor_rollout_ref.actor.megatron.override_transformer_config.fp8="e4m3" \\
    +actor_rollout_ref.actor.megatron.override_transformer_config.fp8_recipe="blockwise" \\
    +actor_rollout_ref.actor.optim.override_optimizer_config.fp8_recipe="blockwise" \\
    actor_rollout_ref.actor.megatron.use_mbridge=True
"""

# recipe/dapo/run_dapo_qwen2.5_32b_rollout_corr.sh: the lines that are not Megatron's or not ours
FSDP_ROLLOUT_CORR = """
    actor_rollout_ref.actor.fsdp_config.param_offload=True \\
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=True \\
    actor_rollout_ref.actor.ulysses_sequence_parallel_size=8 \\
    actor_rollout_ref.actor.grad_clip=1.0 \\
    algorithm.rollout_correction.rollout_is=sequence \\
    algorithm.rollout_correction.rollout_is_threshold=2.0 \\
    algorithm.rollout_correction.rollout_is_batch_normalize=true \\
    algorithm.rollout_correction.rollout_rs="seq_mean_k1" \\
    algorithm.rollout_correction.rollout_rs_threshold="0.99_1.01" \\
    reward_model.overlong_buffer.enable=True \\
    reward_model.overlong_buffer.len=4096 \\
    reward_model.overlong_buffer.penalty_factor=1.0 \\
    trainer.logger='["console","wandb"]'
"""


def shell_args(block: str) -> list[str]:
    """The argument list bash passes for ``block``: quotes, $((...)) and line continuations as in the script."""
    out = subprocess.run(["bash", "-c", "printf '%s\\0' " + block.strip()], capture_output=True, text=True, check=True)
    return out.stdout.split("\0")[:-1]


def test_shell_passes_hydra_syntax_through():
    args = shell_args(MEGATRON_LOCAL)
    assert "+reward_model.reward_kwargs.overlong_buffer_cfg.len=4096" in args
    assert "trainer.logger=[console,wandb]" in args
    assert "data.val_files=['/data/aime-2024.parquet']" in args


def test_megatron_local_block_lands_where_it_means_the_same(caplog):
    with caplog.at_level(logging.INFO, logger="dapo_megatron.verl_compat"):
        cfg = load_config(None, shell_args(MEGATRON_LOCAL))
    d, a, r, alg, t = cfg.data, cfg.actor, cfg.rollout, cfg.algorithm, cfg.trainer
    assert d.train_files == ["/data/dapo-math-17k.parquet"] and d.val_files == ["/data/aime-2024.parquet"]
    assert (d.prompt_key, d.truncation, d.max_prompt_length, d.max_response_length) == ("prompt", "left", 2048, 8192)
    assert d.train_batch_size == 256 and r.n == 2
    assert (alg.clip_ratio_low, alg.clip_ratio_high, alg.clip_ratio_c, alg.loss_agg_mode) == (
        0.2,
        0.28,
        10.0,
        "token-mean",
    )
    assert a.model_path == "/models/Qwen2.5-Math-7B" and a.recompute == "full"
    assert (a.optim.lr, a.optim.lr_warmup_steps, a.optim.weight_decay, a.optim.clip_grad) == (1e-6, 10, 0.1, 1.0)
    assert a.ppo_mini_batch_size == 16 and a.entropy_coeff == 0
    assert (a.offload.params, a.offload.grads, a.offload.optimizer) == (True, True, True)
    assert (a.parallel.tensor_model_parallel_size, a.parallel.pipeline_model_parallel_size) == (4, 4)
    assert (r.gpu_memory_utilization, r.tensor_model_parallel_size, r.max_num_batched_tokens) == (0.8, 4, 10240)
    assert (r.temperature, r.top_p, r.top_k) == (1.0, 1.0, -1)
    assert (r.val.temperature, r.val.top_p, r.val.top_k, r.val.do_sample, r.val.n) == (1.0, 0.7, -1, True, 1)
    ob = alg.overlong_buffer
    assert (ob.enable, ob.len, ob.penalty_factor) == (True, 4096, 1.0)
    assert t.logger == ["console", "wandb"] and (t.project_name, t.nnodes, t.n_gpus_per_node) == ("DAPO", 1, 16)
    assert (t.val_before_train, t.test_freq, t.total_epochs) == (False, 10, 10)
    assert t.checkpoint.save_freq == 10 and t.checkpoint.resume == "disable"
    assert t.output_dir == "/ckpts/DAPO/DAPO-Qwen2.5-7b-MATH-megatron"
    # micro-batch keys: one line, since the dynamic batch size is on (our default)
    lines = [r.getMessage() for r in caplog.records if "micro-batch" in r.getMessage()]
    assert len(lines) == 1 and "ppo_micro_batch_size_per_gpu=2" in lines[0]


def test_megatron_8b_block_bf16_loads_and_fp16_is_refused_by_its_verl_name():
    cfg = load_config(None, shell_args(MEGATRON_8B.replace("DTYPE", "bfloat16")))
    assert (cfg.actor.params_dtype, cfg.rollout.dtype) == ("bfloat16", "bfloat16")
    assert cfg.actor.max_tokens_per_micro_batch == 10240 and cfg.actor.use_dynamic_bsz
    assert cfg.actor.parallel.tensor_model_parallel_size == 2 and cfg.data.train_batch_size == 32
    assert cfg.trainer.checkpoint.save_freq == -1 and cfg.trainer.checkpoint.resume == "auto"
    with pytest.raises(
        ConfigError,
        match=r"actor\.params_dtype: float16 .* \(set by verl's actor_rollout_ref\.actor\.megatron\.dtype\)",
    ):
        load_config(None, shell_args(MEGATRON_8B.replace("DTYPE", "float16")))


def test_fp8_block_is_refused_key_by_key():
    args = shell_args(MEGATRON_8B.replace("DTYPE", "bfloat16")) + shell_args(FP8)
    with pytest.raises(ConfigError) as err:
        load_config(None, args)
    msg = str(err.value)
    assert "3 problem(s)" in msg
    assert "override_transformer_config.fp8=e4m3: refused: the transformer config comes from the HF config" in msg
    assert "override_transformer_config.fp8_recipe=blockwise: refused" in msg
    assert "optim.override_optimizer_config.fp8_recipe=blockwise: refused" in msg
    assert "use_mbridge" not in msg


def test_fsdp_and_rollout_correction_refusals_name_our_equivalent():
    with pytest.raises(ConfigError) as err:
        load_config(None, shell_args(FSDP_ROLLOUT_CORR))
    msg = str(err.value)
    assert "6 problem(s)" in msg
    assert (
        "actor_rollout_ref.actor.fsdp_config.param_offload=True: refused: FSDP only; "
        "use actor_rollout_ref.actor.megatron.param_offload (our actor.offload.params)"
    ) in msg
    assert (
        "fsdp_config.optimizer_offload=True: refused: FSDP only; "
        "use actor_rollout_ref.actor.megatron.optimizer_offload (our actor.offload.optimizer)"
    ) in msg
    assert (
        "ulysses_sequence_parallel_size=8: refused: FSDP (Ulysses) only" in msg
        and "our actor.parallel.sequence_parallel" in msg
    )
    assert "rollout_is=sequence: refused: only token-level truncated importance sampling" in msg
    assert "rollout_is_batch_normalize=True: refused" in msg and "rollout_rs=seq_mean_k1: refused" in msg


def test_the_megatron_alternatives_of_the_refused_lines_load():
    cfg = load_config(
        None,
        shell_args(FSDP_ROLLOUT_CORR)[3:4]  # grad_clip
        + [
            "algorithm.rollout_correction.rollout_is=token",
            "algorithm.rollout_correction.rollout_is_threshold=2.0",
            "algorithm.rollout_correction.rollout_is_batch_normalize=false",
            "algorithm.rollout_correction.rollout_rs=null",
            "algorithm.rollout_correction.rollout_rs_threshold=0.99_1.01",
        ]
        + shell_args(FSDP_ROLLOUT_CORR)[9:]
        + ["data.max_response_length=8192"],
    )
    assert cfg.actor.optim.clip_grad == 1.0 and cfg.trainer.logger == ["console", "wandb"]
    assert (cfg.algorithm.rollout_is.enable, cfg.algorithm.rollout_is.cap) == (True, 2.0)
    assert (cfg.algorithm.overlong_buffer.enable, cfg.algorithm.overlong_buffer.len) == (True, 4096)


@pytest.mark.parametrize(
    "override, message",
    [
        ("actor_rollout_ref.actor.use_kl_loss=True", "use_kl_loss=True: refused: a KL loss needs a reference model"),
        ("actor_rollout_ref.actor.kl_loss_coef=0.001", "kl_loss_coef=0.001: refused: a non-zero KL loss coefficient"),
        ("algorithm.kl_ctrl.kl_coef=0.001", "kl_coef=0.001: refused: a non-zero KL coefficient needs a reference"),
        ("algorithm.use_kl_in_reward=True", "use_kl_in_reward=True: refused: a KL penalty in the reward needs"),
        ("actor_rollout_ref.rollout.name=sglang", "name=sglang: refused: the rollout engine is vLLM"),
        ("actor_rollout_ref.actor.strategy=fsdp", "strategy=fsdp: refused: this trainer is Megatron only"),
        ("critic.optim.lr=1e-5", "critic.optim.lr=1e-05: refused: no critic in GRPO"),
        ("actor_rollout_ref.actor.clip_ratio=0.2", "clip_ratio=0.2: refused: verl uses it only where"),
        ("trainer.max_actor_ckpt_to_keep=null", "max_actor_ckpt_to_keep=null: refused: null keeps every checkpoint"),
        ("actor_rollout_ref.rollout.multi_turn.enable=True", "multi_turn.enable: a verl key with no equivalent here"),
        (
            "+reward_model.reward_kwargs.max_resp_len=4096",
            "max_resp_len=4096: refused: the overlong buffer counts back",
        ),
        ("~trainer.logger", "deleting a key (Hydra's ~) is not supported"),
    ],
)
def test_refusals_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_conflicting_keys_are_refused_rather_than_one_silently_winning():
    with pytest.raises(ConfigError, match=r"grad_clip=0.5: conflicts with actor_rollout_ref.actor.optim.clip_grad=1.0"):
        load_config(None, ["actor_rollout_ref.actor.optim.clip_grad=1.0", "actor_rollout_ref.actor.grad_clip=0.5"])
    with pytest.raises(ConfigError, match=r"algorithm.clip_ratio_high=0.3: conflicts with verl's"):
        load_config(None, ["actor_rollout_ref.actor.clip_ratio_high=0.28", "algorithm.clip_ratio_high=0.3"])


def test_value_conversions():
    cfg = load_config(
        None,
        [
            "actor_rollout_ref.rollout.top_k=0",
            "actor_rollout_ref.actor.optim.betas=[0.9,0.95]",
            "actor_rollout_ref.actor.optim.lr_warmup_steps=-1",
            "actor_rollout_ref.rollout.load_format=dummy_megatron",
            "reward_model.reward_manager=naive",
            "trainer.resume_mode=resume_path",
            "trainer.resume_from_path=/ckpts/global_step_40",
            "trainer.max_actor_ckpt_to_keep=3",
            "custom_reward_function.path=/r/my_reward.py",
            "custom_reward_function.name=score",
            "algorithm.norm_adv_by_std_in_grpo=False",
            "actor_rollout_ref.actor.use_dynamic_bsz=False",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
            "actor_rollout_ref.rollout.free_cache_engine=False",
            "++data.tokenizer=/tok",
        ],
    )
    assert cfg.rollout.top_k == -1 and (cfg.actor.optim.adam_beta1, cfg.actor.optim.adam_beta2) == (0.9, 0.95)
    assert cfg.actor.optim.lr_warmup_steps == 0 and cfg.rollout.load_format == "dummy"
    assert cfg.algorithm.overlong_buffer.enable is False
    assert cfg.trainer.checkpoint.resume == "/ckpts/global_step_40" and cfg.trainer.checkpoint.keep_last == 3
    assert (cfg.reward.custom_function.path, cfg.reward.custom_function.name) == ("/r/my_reward.py", "score")
    assert cfg.algorithm.norm_adv_by_std is False and cfg.rollout.free_cache_engine is False
    assert cfg.actor.use_dynamic_bsz is False and cfg.actor.micro_batch_size == 4  # used: dynamic bsz is off
    assert cfg.data.tokenizer_path == "/tok"


def test_explain_says_what_each_verl_key_became():
    text = explain(None, shell_args(MEGATRON_LOCAL))
    assert text.startswith("# resolved configuration\n")
    assert "actor_rollout_ref.actor.megatron.grad_offload=True -> actor.offload.grads=True" in text
    assert "actor_rollout_ref.model.enable_gradient_checkpointing=True -> actor.recompute=full" in text
    assert "algorithm.kl_ctrl.kl_coef=0.0 -> accepted (off)" in text
    assert "+reward_model" not in text  # the Hydra prefix is syntax, not part of the key
    assert "algorithm.filter_groups.enable=True (verl: False)" in text


def test_launch_train_explains_a_verl_block_without_training():
    """The real entry point, ``launch/train.py --config C --explain <verl overrides>``, stops before training."""
    args = shell_args(MEGATRON_8B.replace("DTYPE", "bfloat16"))
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "train.py"),
            "--config",
            str(ROOT / "configs" / "tiny_cpu.yaml"),
            "--explain",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr
    assert (
        "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2 -> actor.parallel.tensor_model_parallel_size=2"
        in out.stdout
    )
    assert re.search(r"^  parallel:\n    tensor_model_parallel_size: 2$", out.stdout, re.M)


def test_every_row_is_reachable_and_documented():
    doc = (ROOT / "docs" / "VERL_COMPAT.md").read_text()
    seen = set()
    for row in TABLE:
        assert row.verl not in seen, f"two rows for {row.verl}"
        seen.add(row.verl)
        probe = row.verl[:-2] + ".x" if row.verl.endswith(".*") else row.verl
        assert find_row(probe) is row, row.verl
        assert f"`{row.verl}`" in doc, f"{row.verl} is not listed in docs/VERL_COMPAT.md"
