"""Per-GPU memory and per-step cost estimates for one DAPO run (pure arithmetic, no devices).

Why a separate module: :mod:`dapo_megatron.planning.feasibility` decides, formats and
suggests; this module only counts bytes and FLOPs, so every number can be checked
against a hand computation in a unit test.

Units: bytes internally, GiB (2**30) when printed. The model is a llama-family decoder
(Qwen2/Llama/Qwen3 dense) described by :class:`ModelShape`.

Memory model, per GPU (all formulas are per rank; ``t`` = actor TP, ``p`` = actor PP,
``dp`` = world / (t p), ``tr`` = rollout TP, ``T`` = tokens per micro-batch):

* actor weights: ``N_r x params_dtype bytes`` where ``N_r`` counts this rank's share
  (TP-sharded matrices / t, replicated norms, the vocab-parallel embedding on the first
  stage and output layer on the last; worst stage taken).
* grads: ``N_r x 4`` -- Megatron DDP keeps fp32 main grads for bf16 training.
* optimizer: Adam ``m`` and ``v`` (fp32) plus an fp32 master copy when params are not
  fp32 = 12 (or 8) bytes per parameter, divided by ``dp`` with the distributed optimizer.
* activations (flash attention, no dropout, bf16), bytes per token per layer
  ``A = 8H/s + (2 (nq + 2 ng) d + 2 nq d + 6F) / t`` with ``s = t`` under sequence
  parallelism else 1: the inputs of the two norms and of the QKV and FC1 linears (``8H``),
  q/k/v and the attention output (flash attention keeps no s x s scores), the SwiGLU
  input ``2F`` and output ``F`` (x 2 bytes).
  ``none`` and ``selective`` (Megatron recomputes core attention only, which under
  flash attention keeps nothing extra) store ``L_stage x A`` per token;
  ``full`` stores only each layer's input ``2H/s`` and re-materialises one layer (``A``)
  during backward. With the 1F1B pipeline schedule stage ``i`` holds
  ``min(p - i, micro-batches)`` micro-batches in flight.
* log-prob logits: ``T x Vp/t x 4`` bytes on the last stage (bf16 logits plus their bf16
  gradient, the same as one fp32 copy; the vocab-parallel kernel never gathers the
  vocabulary).
* vLLM: a budget of ``gpu_memory_utilization x M`` holds weights
  (``P / tr x rollout dtype``), the profiling activation peak for
  ``max_num_batched_tokens`` and the sampler's fp32 logits, a CUDA-graph allowance, and
  the KV cache with ``2 x L x max(1, ng / tr) x d x dtype bytes`` per token.
* which of these is on the device in each phase is not decided here: it is
  :class:`dapo_megatron.lifecycle.LifecyclePlan`'s residency table, the one the trainer
  executes.  Engine sleep (``rollout.free_cache_engine``) releases the whole budget while
  the actor trains and keeps only the weights during the weight sync; actor offload
  (``actor.offload.*``) removes weights, grads or optimizer state from the rollout phase
  (and grads and optimizer state from the sync).  In the rollout phase vLLM insists on
  finding its whole budget free at start-up (``requested = gpu_memory_utilization x total``).
* weight sync: additionally one bucket and the largest merged tensor in flight.
* verify (``rollout.weight_sync.verify``): the awake engine next to the actor's weights.
* a fixed reserve (CUDA context, NCCL communicators, allocator slack) in every phase.
"""

from __future__ import annotations

import json
import math
import os
import types
from dataclasses import dataclass, field

from dapo_megatron.actor import RECOMPUTE
from dapo_megatron.config import DapoConfig, data_parallel_size
from dapo_megatron.dtypes import DTYPE_BYTES
from dapo_megatron.lifecycle import LifecyclePlan
from dapo_megatron.lifecycle import Phase as LifecyclePhase
from dapo_megatron.models import DecoderLayout, get_layout, pad_vocab_size

GiB = 1 << 30
# vLLM pads its vocabulary to a multiple of 64; negligible next to the weights, ignored.
CUDA_GRAPH_GIB = 0.5  # allowance for captured CUDA graphs when enforce_eager is off


# The planner's model description is the mapping's own layout (tp=1: the HF vocabulary padded
# for one rank; per-TP padding is :func:`pad_vocab_size`): parameter counts come from the
# family's table, so a model family is described once.
ModelShape = DecoderLayout


def model_shape_from_hf(hf_config) -> ModelShape:
    """The layout of an HF config object, validated by the same code as the actor's."""
    return get_layout(hf_config, tp=1)


def load_model_shape(path: str) -> ModelShape:
    """Read an HF ``config.json`` (file or the directory holding it) without loading weights.

    Why not ``transformers.AutoConfig``: the planner runs on login nodes and before every
    launch, and a plain JSON read keeps it at well under a second.

    Raises:
        FileNotFoundError: no config.json at ``path``.
        ValueError: unreadable JSON, missing fields, or an unsupported architecture.
    """
    file = path if path.endswith(".json") or os.path.isfile(path) else os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"model config not found: {file}")
    try:
        with open(file) as fh:
            raw = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file}: not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(raw).__name__}")
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [k for k in required if k not in raw]
    if missing:
        raise ValueError(f"{file}: missing field(s) {', '.join(missing)}")
    try:
        return model_shape_from_hf(types.SimpleNamespace(**raw))
    except ValueError as exc:
        raise ValueError(f"{file}: {exc}") from exc


# ------------------------------------------------------------------ actor state
def actor_stage_params(shape: ModelShape, tp: int, pp: int, stage: int) -> int:
    """Parameters held by one TP rank of pipeline stage ``stage`` (layers split evenly)."""
    # tied with PP > 1: the last stage keeps a copy of the output layer
    layers = shape.num_layers // pp
    return shape.rank_params(tp, layers=layers, pre_process=stage == 0, post_process=stage == pp - 1, tied_copy=pp > 1)


@dataclass(frozen=True)
class ActorState:
    """Bytes of the actor's persistent state on one rank."""

    params: int
    weights: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer


def actor_state_bytes(params: int, params_dtype: str, dp: int, distributed_optimizer: bool) -> ActorState:
    """Weights in params_dtype, fp32 main grads, Adam (+ fp32 master unless params are fp32)."""
    per_param_optim = 8 + (0 if params_dtype == "float32" else 4)
    shards = dp if distributed_optimizer else 1
    return ActorState(
        params=params,
        weights=params * DTYPE_BYTES[params_dtype],
        grads=params * 4,
        optimizer=math.ceil(params * per_param_optim / shards),
    )


# ------------------------------------------------------------------ activations
def layer_activation_bytes_per_token(shape: ModelShape, tp: int, sequence_parallel: bool) -> int:
    """Bytes one layer saves for backward per token (bf16, flash attention, no dropout)."""
    sp = tp if sequence_parallel else 1
    d = shape.head_dim
    attn = 2 * shape.qkv_rows + 2 * shape.num_attention_heads * d
    return 8 * shape.hidden_size // sp + (attn + 6 * shape.ffn_hidden_size) // tp


def training_activation_bytes(
    shape: ModelShape,
    *,
    tokens: int,
    tp: int,
    pp: int,
    sequence_parallel: bool,
    recompute: str,
    in_flight: int,
) -> int:
    """Activation bytes of one pipeline stage holding ``in_flight`` micro-batches of ``tokens``."""
    if recompute not in RECOMPUTE:
        raise ValueError(f"actor.recompute: unknown mode {recompute!r}")
    layers = shape.num_layers // pp
    per_layer = layer_activation_bytes_per_token(shape, tp, sequence_parallel)
    if recompute == "full":
        sp = tp if sequence_parallel else 1
        stored = layers * 2 * shape.hidden_size // sp
        return tokens * (in_flight * stored + per_layer)
    return tokens * in_flight * layers * per_layer


def forward_activation_bytes(shape: ModelShape, *, tokens: int, tp: int, sequence_parallel: bool) -> int:
    """Transient bytes of a no-grad forward: one layer's working set (nothing is kept)."""
    return tokens * layer_activation_bytes_per_token(shape, tp, sequence_parallel)


def logits_bytes(shape: ModelShape, *, tokens: int, tp: int) -> int:
    """``[tokens x Vp/t]`` in fp32 (= bf16 logits + their bf16 gradient)."""
    return tokens * (pad_vocab_size(shape.vocab_size, tp) // tp) * 4


# --------------------------------------------------------------------------- vLLM
def kv_bytes_per_token(shape: ModelShape, rollout_tp: int, dtype: str) -> int:
    """K and V of every layer for one token on one GPU (KV heads are replicated when tr > ng)."""
    kv_heads = max(1, shape.num_query_groups // rollout_tp)
    return 2 * shape.num_layers * kv_heads * shape.head_dim * DTYPE_BYTES[dtype]


def vllm_weight_bytes(shape: ModelShape, rollout_tp: int, dtype: str) -> int:
    replicated = shape.replicated_params()
    sharded = shape.total_params() - replicated
    return (sharded // rollout_tp + replicated) * DTYPE_BYTES[dtype]


def vllm_activation_bytes(shape: ModelShape, *, rollout_tp: int, dtype: str, batched_tokens: int, seqs: int) -> int:
    """Profiling peak: one layer's intermediates for max_num_batched_tokens plus fp32 sampler logits (x2)."""
    tr = rollout_tp
    per_token = (
        2 * shape.hidden_size
        + shape.qkv_rows // tr
        + shape.num_attention_heads * shape.head_dim // tr
        + 3 * shape.ffn_hidden_size // tr
    )
    return batched_tokens * per_token * DTYPE_BYTES[dtype] + seqs * shape.vocab_size * 4 * 2


@dataclass(frozen=True)
class VllmBudget:
    budget: int  # gpu_memory_utilization x device memory
    weights: int
    activations: int
    cuda_graphs: int
    kv_available: int
    kv_per_token: int
    max_model_len: int
    max_num_seqs: int

    @property
    def kv_needed_full(self) -> int:
        """KV for max_num_seqs sequences of max_model_len tokens (no preemption ever)."""
        return self.max_num_seqs * self.max_model_len * self.kv_per_token

    @property
    def kv_tokens(self) -> int:
        return max(0, self.kv_available) // self.kv_per_token

    @property
    def full_length_seqs(self) -> int:
        """Sequences of max_model_len tokens that fit in the KV cache at once."""
        return self.kv_tokens // self.max_model_len


def vllm_budget(cfg: DapoConfig, shape: ModelShape, gpu_bytes: int) -> VllmBudget:
    r = cfg.rollout
    budget = int(r.gpu_memory_utilization * gpu_bytes)
    weights = vllm_weight_bytes(shape, r.tensor_model_parallel_size, r.dtype)
    act = vllm_activation_bytes(
        shape,
        rollout_tp=r.tensor_model_parallel_size,
        dtype=r.dtype,
        batched_tokens=r.max_num_batched_tokens,
        seqs=r.max_num_seqs,
    )
    graphs = 0 if r.enforce_eager else int(CUDA_GRAPH_GIB * GiB)
    return VllmBudget(
        budget=budget,
        weights=weights,
        activations=act,
        cuda_graphs=graphs,
        kv_available=budget - weights - act - graphs,
        kv_per_token=kv_bytes_per_token(shape, r.tensor_model_parallel_size, r.dtype),
        max_model_len=cfg.data.max_prompt_length + cfg.data.max_response_length,
        max_num_seqs=r.max_num_seqs,
    )


# ------------------------------------------------------------------------ phases
@dataclass
class Phase:
    """One phase of the step and its per-GPU memory items (name -> bytes)."""

    name: str
    items: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.items.values())


@dataclass
class MemoryPlan:
    gpu_bytes: int
    reserve: int
    dp: int
    micro_batch_tokens: int
    micro_batches: int
    actor: ActorState  # the worst pipeline stage
    vllm: VllmBudget
    phases: list[Phase]
    engine_sleeps: bool

    def phase(self, name: str) -> Phase:
        for p in self.phases:
            if p.name == name:
                return p
        raise KeyError(f"no phase {name!r}; phases: {[p.name for p in self.phases]}")

    @property
    def peak(self) -> Phase:
        return max(self.phases, key=lambda p: p.total)

    @property
    def sleep_frees(self) -> int:
        """What engine sleep hands back to the actor while it trains."""
        return self.vllm.budget if self.engine_sleeps else 0


def micro_batch_tokens(cfg: DapoConfig) -> int:
    seq = cfg.data.max_prompt_length + cfg.data.max_response_length
    if cfg.actor.use_dynamic_bsz:
        return cfg.actor.max_tokens_per_micro_batch
    return cfg.actor.micro_batch_size * seq


def micro_batches_per_mini_batch(cfg: DapoConfig, dp: int) -> int:
    """Worst case (every sequence at max length) micro-batches per DP rank per optimizer step."""
    seq = cfg.data.max_prompt_length + cfg.data.max_response_length
    trajectories = max(1, cfg.actor.ppo_mini_batch_size * cfg.rollout.n // max(dp, 1))
    if cfg.actor.use_dynamic_bsz:
        per_micro = max(1, cfg.actor.max_tokens_per_micro_batch // seq)
    else:
        per_micro = cfg.actor.micro_batch_size
    return math.ceil(trajectories / per_micro)


def estimate_memory(
    cfg: DapoConfig, shape: ModelShape, *, world_size: int, gpu_bytes: int, reserve_bytes: int
) -> MemoryPlan:
    """Per-GPU memory of the rollout, log-prob, train and weight-sync phases (worst rank)."""
    a, p = cfg.actor, cfg.actor.parallel
    tp, pp, sp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.sequence_parallel
    dp = max(1, data_parallel_size(cfg, world_size))
    tokens = micro_batch_tokens(cfg)
    n_micro = micro_batches_per_mini_batch(cfg, dp)
    vllm = vllm_budget(cfg, shape, gpu_bytes)
    sleeps = cfg.rollout.free_cache_engine
    lifecycle = LifecyclePlan.from_config(cfg)

    def engine(phase: LifecyclePhase) -> dict[str, int]:
        res = lifecycle.residency(phase)
        if res.engine_kv:
            return {"vLLM budget": vllm.budget}
        return {"vLLM weights": vllm.weights} if res.engine_weights else {}

    stages = sorted({0, pp - 1})
    names = {"rollout": LifecyclePhase.ROLLOUT, "log-prob": LifecyclePhase.TRAIN, "train": LifecyclePhase.TRAIN}
    names["weight sync"] = LifecyclePhase.SYNC
    if lifecycle.verify:
        names["verify"] = LifecyclePhase.VERIFY
    per_stage: dict[str, list[Phase]] = {name: [] for name in names}
    states = []
    for stage in stages:
        st = actor_state_bytes(
            actor_stage_params(shape, tp, pp, stage), a.params_dtype, dp, a.optim.use_distributed_optimizer
        )
        states.append(st)

        def actor(phase: LifecyclePhase, st=st) -> dict[str, int]:
            res = lifecycle.residency(phase)
            held = {"actor weights": (res.params, st.weights), "actor grads (fp32)": (res.grads, st.grads)}
            held["optimizer state"] = (res.optimizer, st.optimizer)
            return {name: size for name, (on, size) in held.items() if on}

        last = stage == pp - 1
        logits = logits_bytes(shape, tokens=tokens, tp=tp) if last else 0
        in_flight = min(pp - stage, n_micro)
        # weight sync: one bucket and the largest merged tensor in flight
        largest = pad_vocab_size(shape.vocab_size, tp) * shape.hidden_size * DTYPE_BYTES[a.params_dtype]
        largest = max(largest, 2 * shape.ffn_hidden_size * shape.hidden_size * DTYPE_BYTES[a.params_dtype])
        work = {
            "rollout": {},
            "log-prob": {
                "activations": forward_activation_bytes(shape, tokens=tokens, tp=tp, sequence_parallel=sp),
                "logits": logits,
            },
            "train": {
                "activations": training_activation_bytes(
                    shape,
                    tokens=tokens,
                    tp=tp,
                    pp=pp,
                    sequence_parallel=sp,
                    recompute=a.recompute,
                    in_flight=in_flight,
                ),
                "logits": logits,
            },
            "weight sync": {
                "sync bucket + gathered tensor": cfg.rollout.weight_sync.bucket_size_mb * (1 << 20) + largest,
            },
            "verify": {},
        }
        for name, phase in names.items():
            items = {**actor(phase), **engine(phase), **work[name], "reserve": reserve_bytes}
            per_stage[name].append(Phase(name, items))
    phases = [max(v, key=lambda ph: ph.total) for v in per_stage.values()]
    return MemoryPlan(
        gpu_bytes=gpu_bytes,
        reserve=reserve_bytes,
        dp=dp,
        micro_batch_tokens=tokens,
        micro_batches=n_micro,
        actor=max(states, key=lambda s: s.total),
        vllm=vllm,
        phases=phases,
        engine_sleeps=sleeps,
    )


# -------------------------------------------------------------------------- cost
@dataclass(frozen=True)
class CostPlan:
    trained_tokens: int
    generated_tokens: int
    train_flops: float
    logprob_flops: float
    gen_flops: float
    train_seconds: float
    gen_seconds: float

    @property
    def step_seconds(self) -> float:
        return self.train_seconds + self.gen_seconds


def attention_flops_forward(shape: ModelShape, seq_len: int) -> float:
    """Causal QK^T and AV of one sequence: 2 matmuls x 2 FLOPs x nq d x s^2 / 2, every layer."""
    return 2.0 * shape.num_layers * shape.num_attention_heads * shape.head_dim * seq_len**2


def model_training_flops(shape: ModelShape, seq_lengths, *, epochs: int = 1) -> float:
    """Model FLOPs (no recompute) of forward + backward over the given sequences: 6 P T + 3 x attention,
    P without the input embedding (:meth:`ModelShape.matmul_params`).

    The numerator of MFU: recomputed activations are excluded, as in the usual definition.
    """
    params = shape.matmul_params()
    return float(epochs) * sum(6.0 * params * n + 3.0 * attention_flops_forward(shape, int(n)) for n in seq_lengths)


def estimate_cost(
    cfg: DapoConfig,
    shape: ModelShape,
    *,
    world_size: int,
    mean_prompt_tokens: float,
    mean_response_tokens: float,
    gen_rounds: float,
    peak_tflops: float,
    train_mfu: float,
    gen_mfu: float,
) -> CostPlan:
    """FLOPs and seconds of one training step.

    ``P`` is :meth:`ModelShape.matmul_params` (no input embedding).
    Training: ``6 P T`` (+ ``2 P T`` more with full recompute) plus the attention term
    ``3 x`` (4 with full recompute) the causal forward attention, times ppo_epochs; old
    log-probs: one forward ``2 P T`` + forward attention. Generation: ``2 P`` per generated
    token plus attention over the growing context, for ``gen_rounds`` rounds of
    ``gen_batch_size x n`` responses. Seconds = FLOPs / (world x peak x MFU).
    """
    d, a = cfg.data, cfg.actor
    params = shape.matmul_params()
    seq = mean_prompt_tokens + mean_response_tokens
    trajectories = d.train_batch_size * cfg.rollout.n
    trained = trajectories * seq
    passes = 4.0 if a.recompute == "full" else 3.0
    attn_fwd = trajectories * attention_flops_forward(shape, int(seq))
    train_flops = a.ppo_epochs * (passes * 2.0 * params * trained + passes * attn_fwd)
    logprob_flops = 2.0 * params * trained + attn_fwd
    generated = gen_rounds * d.gen_batch_size * cfg.rollout.n * mean_response_tokens
    # per generated token: 2P + 4 L nq d x (context), mean context = prompt + response / 2
    ctx = mean_prompt_tokens + mean_response_tokens / 2
    gen_attn = 4.0 * shape.num_layers * shape.num_attention_heads * shape.head_dim * ctx
    gen_flops = generated * (2.0 * params + gen_attn)
    peak = world_size * peak_tflops * 1e12
    return CostPlan(
        trained_tokens=int(trained),
        generated_tokens=int(generated),
        train_flops=train_flops,
        logprob_flops=logprob_flops,
        gen_flops=gen_flops,
        train_seconds=(train_flops + logprob_flops) / (peak * train_mfu),
        gen_seconds=gen_flops / (peak * gen_mfu),
    )
