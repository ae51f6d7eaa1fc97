"""The config tree: YAML + overrides load, and every bad value is named by key."""

from pathlib import Path

import pytest

from dapo_megatron.config import ConfigError, DapoConfig, load_config, to_yaml, validate

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "dapo_qwen2.5_32b.yaml"
TINY = ROOT / "configs" / "tiny_cpu.yaml"


def test_defaults_are_valid():
    validate(DapoConfig())


def test_recipe_carries_the_published_values():
    cfg = load_config(str(RECIPE))
    alg, fg = cfg.algorithm, cfg.algorithm.filter_groups
    assert (alg.clip_ratio_low, alg.clip_ratio_high, alg.clip_ratio_c) == (0.2, 0.28, 10.0)
    assert alg.loss_agg_mode == "token-mean"
    assert (fg.enable, fg.metric, fg.max_num_gen_batches) == (True, "acc", 10)
    assert (cfg.data.train_batch_size, cfg.data.gen_batch_size, cfg.rollout.n) == (512, 1536, 16)
    assert cfg.actor.ppo_mini_batch_size == 32
    assert cfg.data.train_batch_size // cfg.actor.ppo_mini_batch_size == 16  # optimizer steps per step
    assert cfg.actor.ppo_epochs == 1
    assert (cfg.data.max_prompt_length, cfg.data.max_response_length, cfg.data.truncation) == (2048, 20480, "left")
    assert (alg.overlong_buffer.enable, alg.overlong_buffer.len, alg.overlong_buffer.penalty_factor) == (
        True,
        4096,
        1.0,
    )
    o = cfg.actor.optim
    assert (o.lr, o.lr_warmup_steps, o.weight_decay, o.clip_grad) == (1e-6, 10, 0.1, 1.0)
    r = cfg.rollout
    assert (r.temperature, r.top_p, r.top_k) == (1.0, 1.0, -1)
    assert (r.val.temperature, r.val.top_p, r.val.n) == (1.0, 0.7, 32)
    assert (r.tensor_model_parallel_size, r.gpu_memory_utilization, r.max_num_batched_tokens) == (4, 0.8, 22528)
    assert (cfg.trainer.test_freq, cfg.trainer.checkpoint.save_freq, cfg.trainer.val_before_train) == (5, 5, True)
    assert cfg.actor.entropy_coeff == 0.0
    validate(cfg, world_size=16 * 8)


def test_tiny_config_fits_two_processes():
    cfg = load_config(str(TINY))
    validate(cfg, world_size=2)


def test_overrides_win_over_the_file_and_are_typed():
    cfg = load_config(
        str(TINY),
        [
            "algorithm.clip_ratio_high=0.3",
            "actor.optim.lr=3e-5",
            "data.train_files=a.parquet",
            "trainer.logger=[jsonl]",
        ],
    )
    assert cfg.algorithm.clip_ratio_high == 0.3
    assert cfg.actor.optim.lr == 3e-5
    assert cfg.data.train_files == ["a.parquet"]
    assert cfg.trainer.logger == ["jsonl"]


def test_yaml_dump_reloads_to_the_same_tree(tmp_path):
    cfg = load_config(str(RECIPE), ["rollout.n=4"])
    path = tmp_path / "dumped.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(str(path)) == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("algorithm.clip_ratio_hgh=0.3", r"algorithm\.clip_ratio_hgh.*Did you mean.*clip_ratio_high"),
        ("actor.optim.lr=abc", r"actor\.optim\.lr"),
        ("rollout.n=two", r"rollout\.n"),
        ("nonsense", r"override 'nonsense' is not of the form key\.sub=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_typo_in_yaml_file_names_the_key(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("algorithm:\n  filter_groups:\n    enabel: true\n")
    with pytest.raises(ConfigError, match=r"algorithm\.filter_groups\.enabel"):
        load_config(str(path))


def test_broken_yaml_and_missing_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot parse YAML"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algorithm.clip_ratio_high=0.1"], r"algorithm\.clip_ratio_high: must be >= algorithm\.clip_ratio_low"),
        (["algorithm.clip_ratio_c=1.0"], r"algorithm\.clip_ratio_c: dual-clip constant must be > 1"),
        (["algorithm.overlong_buffer.len=600"], r"algorithm\.overlong_buffer\.len: buffer \(600\) is longer than"),
        (["algorithm.loss_agg_mode=mean"], r"algorithm\.loss_agg_mode: 'mean' is not one of token-mean"),
        (["algorithm.filter_groups.metric=reward"], r"algorithm\.filter_groups\.metric"),
        (
            ["data.train_batch_size=10", "actor.ppo_mini_batch_size=4"],
            r"actor\.ppo_mini_batch_size: data\.train_batch_size \(10\)",
        ),
        (
            ["actor.parallel.sequence_parallel=true"],
            r"actor\.parallel\.sequence_parallel: needs tensor_model_parallel_size > 1",
        ),
        (["rollout.top_p=0"], r"rollout\.top_p"),
        (["actor.max_tokens_per_micro_batch=100"], r"actor\.max_tokens_per_micro_batch: 100 cannot hold one sequence"),
        (["trainer.logger=[console,mlflow]"], r"trainer\.logger: 'mlflow'"),
        (["trainer.val_only=true"], r"trainer\.val_only: needs data\.val_files"),
        (["actor.inject_nan_loss_at_steps=[0]"], r"actor\.inject_nan_loss_at_steps: training steps are 1-based"),
        (["actor.params_dtype=float16"], r"actor\.params_dtype: float16 is not supported: .* use bfloat16"),
        (["actor.transformer_impl=apex"], r"actor\.transformer_impl: 'apex' is not one of transformer_engine, local"),
        (["rollout.load_format=safetensors"], r"rollout\.load_format: 'safetensors' is not one of auto, dummy"),
        (["rollout.max_mismatch=0"], r"rollout\.max_mismatch: must be > 0 \(or null for the dtype default\)"),
        (["rollout.weight_sync.probe_prompts=0"], r"rollout\.weight_sync\.probe_prompts: must be > 0"),
        (
            ["actor.ddp.overlap_grad_reduce=false", "actor.ddp.bucket_size=1000000"],
            r"actor\.ddp\.bucket_size: needs actor\.ddp\.overlap_grad_reduce=true",
        ),
        (["actor.ddp.bucket_size=0"], r"actor\.ddp\.bucket_size"),
    ],
)
def test_range_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["algorithm.clip_ratio_c=0.5", "rollout.n=0", "reward.timeout_s=0"])
    text = str(info.value)
    assert "3 problem(s)" in text
    for key in ("algorithm.clip_ratio_c", "rollout.n", "reward.timeout_s"):
        assert key in text


def test_layout_against_world_size():
    cfg = load_config(str(RECIPE))
    with pytest.raises(
        ConfigError, match=r"actor\.parallel: tensor \(8\) x pipeline \(2\) = 16 does not divide the world size 24"
    ):
        validate(cfg, world_size=24)
    with pytest.raises(
        ConfigError, match=r"trainer\.n_gpus_per_node: trainer\.nnodes x trainer\.n_gpus_per_node = 128"
    ):
        validate(cfg, world_size=64)

    tiny = load_config(str(TINY), ["actor.parallel.tensor_model_parallel_size=1", "actor.ppo_mini_batch_size=1"])
    with pytest.raises(
        ConfigError, match=r"actor\.ppo_mini_batch_size: 1 prompt groups per mini-batch cannot be split"
    ):
        validate(tiny, world_size=2)

    odd_gen = load_config(str(TINY), ["data.gen_batch_size=15"])
    with pytest.raises(
        ConfigError, match=r"data\.gen_batch_size: 15 prompts cannot be split evenly over 2 rollout replicas"
    ):
        validate(odd_gen, world_size=2)


def test_missing_files_are_named(tmp_path):
    cfg = load_config(None, [f"data.train_files=[{tmp_path}/train.parquet]", f"actor.model_path={tmp_path}/model"])
    with pytest.raises(ConfigError) as info:
        validate(cfg, check_files=True)
    text = str(info.value)
    assert f"data.train_files[0]: file not found: {tmp_path}/train.parquet" in text
    assert f"actor.model_path: no config.json in {tmp_path}/model" in text

    (tmp_path / "train.parquet").write_bytes(b"")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    validate(cfg, check_files=True)


@pytest.mark.parametrize(
    "overrides, message",
    [
        # each of these loaded before, and was refused only once the process groups existed
        (["rollout.temperature=0"], r"rollout\.temperature: must be > 0 .*got 0\.0"),
        (["rollout.val.temperature=-1"], r"rollout\.val\.temperature: must be >= 0"),
        (["rollout.val.top_k=0"], r"rollout\.val\.top_k: must be -1 \(off\) or > 0"),
        (
            ["actor.optim.lr_decay_style=cosine", "actor.optim.lr_decay_steps=0"],
            r"actor\.optim\.lr_decay_steps: must be > 0 for cosine decay",
        ),
    ],
)
def test_values_the_actor_or_engine_would_refuse_fail_on_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_lr_decay_steps_is_only_checked_where_it_is_read():
    load_config(None, ["actor.optim.lr_decay_steps=0"])  # constant schedule: never read


def test_config_error_carries_its_problems():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["algorithm.clip_ratio_c=0.5", "rollout.n=0"])
    problems = info.value.problems
    assert [(p.key, p.message) for p in problems] == [
        ("algorithm.clip_ratio_c", "dual-clip constant must be > 1, got 0.5"),
        ("rollout.n", "must be > 0, got 0"),
    ]
    assert [str(p) for p in problems] == [line.strip()[2:] for line in str(info.value).splitlines()[1:]]


def test_config_error_problems_carry_the_verl_origin():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["actor_rollout_ref.rollout.n=0"])
    (problem,) = info.value.problems
    assert problem.key == "rollout.n"
    assert problem.message.endswith("(set by verl's actor_rollout_ref.rollout.n)")
    assert str(problem) in str(info.value)


def test_actor_load_is_not_a_key():
    # It was validated but never read: a run "starting from" a checkpoint silently started from model_path.
    with pytest.raises(ConfigError, match=r"actor\.load"):
        load_config(None, ["actor.load=/ckpt"])


def test_missing_model_path_is_named(tmp_path):
    (tmp_path / "train.parquet").write_bytes(b"")
    cfg = load_config(None, [f"data.train_files=[{tmp_path}/train.parquet]"])
    with pytest.raises(ConfigError, match=r"actor\.model_path: not set"):
        validate(cfg, check_files=True)


def test_choice_lists_are_the_users_own():
    """The schema checks against the very tuples the modules that act on the value use."""
    from dapo_megatron import config, dtypes, lifecycle
    from dapo_megatron.actor import actor, model, offload, optimizer
    from dapo_megatron.algo import dynamic_sampling, loss
    from dapo_megatron.data import parquet_dataset
    from dapo_megatron.observability import tracking
    from dapo_megatron.planning import memory
    from dapo_megatron.reward import BACKENDS, pool

    assert config.LOSS_AGG_MODES is loss.LOSS_AGG_MODES
    assert config.FILTER_METRICS is dynamic_sampling.FILTER_METRICS
    assert config.ON_EXHAUSTED is dynamic_sampling.ON_EXHAUSTED
    assert config.REWARD_BACKENDS is BACKENDS
    assert config.REWARD_EXECUTORS is pool.EXECUTORS
    assert config.TRUNCATION_MODES is parquet_dataset.TRUNCATION_MODES
    assert config.LR_SCHEDULES is optimizer.LR_SCHEDULES
    assert config.TRANSFORMER_IMPLS is model.TRANSFORMER_IMPLS
    assert config.RECOMPUTE is actor.RECOMPUTE is memory.RECOMPUTE
    assert config.LOGGERS is tracking.LOGGERS
    assert config.DTYPES is dtypes.DTYPES
    assert tuple(memory.DTYPE_BYTES) == dtypes.DTYPES
    assert config.OFFLOAD_KINDS is lifecycle.OFFLOAD_KINDS is offload.OFFLOAD_KINDS


def test_one_dtype_table():
    import torch

    from dapo_megatron import dtypes
    from dapo_megatron.torch_dtypes import torch_dtype

    assert [torch_dtype(name) for name in dtypes.DTYPES] == [torch.float32, torch.bfloat16, torch.float16]
    assert {name: torch.empty(0, dtype=torch_dtype(name)).element_size() for name in dtypes.DTYPES} == (
        dtypes.DTYPE_BYTES
    )
    with pytest.raises(ValueError, match=r"actor\.params_dtype must be one of .* got 'fp8'"):
        torch_dtype("fp8", "actor.params_dtype")


def test_config_imports_no_torch():
    """The planner and ``python -m dapo_megatron.config`` run on a login node in well under a second."""
    import subprocess
    import sys

    code = "import sys, dapo_megatron.config; print(sorted({'torch', 'numpy', 'pyarrow'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
