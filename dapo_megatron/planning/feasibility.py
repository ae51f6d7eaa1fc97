"""Will this config fit this cluster, and what will a step cost: the planner behind ``python -m dapo_megatron.plan``.

Why: a 128-GPU job that dies of OOM after loading a 32B model wastes an hour of queue
and minutes of the whole cluster.  The planner answers from the config and the model's
``config.json`` alone, in under a second, on a login node, and again on every node
before ``torchrun`` starts (``slurm/launch.sh``).  An infeasible plan comes with the
overrides that would make it fit (:func:`suggest`).  The memory and FLOP formulas are in
:mod:`dapo_megatron.planning.memory`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

from dapo_megatron.config import OFFLOAD_KINDS, ConfigError, DapoConfig, validate
from dapo_megatron.models import divisibility_problems
from dapo_megatron.planning.memory import (
    CostPlan,
    GiB,
    MemoryPlan,
    ModelShape,
    estimate_cost,
    estimate_memory,
)
from dapo_megatron.verl_compat import get_path

TIGHT_FRACTION = 0.03  # headroom below this share of the device is reported as a warning


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu_memory_gib: float

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def gpu_bytes(self) -> int:
        return int(self.gpu_memory_gib * GiB)


@dataclass(frozen=True)
class Assumptions:
    """What the config cannot know: throughput, response lengths, runtime overhead."""

    reserve_gib: float = 1.0
    train_mfu: float = 0.35
    gen_mfu: float = 0.10
    peak_tflops: float = 989.0  # H100/H800 dense bf16
    mean_prompt_tokens: float | None = None  # None: half of data.max_prompt_length
    mean_response_tokens: float | None = None  # None: half of data.max_response_length
    gen_rounds: float = 1.0


@dataclass
class Plan:
    cfg: DapoConfig
    shape: ModelShape
    cluster: Cluster
    memory: MemoryPlan
    cost: CostPlan
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)

    @property
    def feasible(self) -> bool:
        return not self.problems


# ------------------------------------------------------------------------ checks
def _layout_problems(cfg: DapoConfig, shape: ModelShape, cluster: Cluster) -> list[str]:
    """Divisibility the world size and the model impose (config.validate plus model shape)."""
    problems: list[str] = []
    try:
        validate(cfg, world_size=cluster.world_size)
    except ConfigError as exc:
        problems += [str(problem) for problem in exc.problems]
    p, r = cfg.actor.parallel, cfg.rollout
    tp, pp, tr = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, r.tensor_model_parallel_size
    for bad in divisibility_problems(shape, tp=tp, pp=pp):
        what = f"the model's {bad.value} layers" if bad.axis == "pp" else f"{bad.name}={bad.value}"
        key = "pipeline" if bad.axis == "pp" else "tensor"
        problems.append(f"actor.parallel.{key}_model_parallel_size: {bad.size} does not divide {what}")
    checks = [
        (shape.num_attention_heads % tr == 0, "rollout.tensor_model_parallel_size",
         f"{tr} does not divide num_attention_heads={shape.num_attention_heads} (vLLM requirement)"),
        (tp <= cluster.gpus_per_node, "actor.parallel.tensor_model_parallel_size",
         f"{tp} spans more than one node ({cluster.gpus_per_node} GPUs per node): TP needs NVLink"),
        (tr <= cluster.gpus_per_node, "rollout.tensor_model_parallel_size",
         f"{tr} spans more than one node ({cluster.gpus_per_node} GPUs per node)"),
    ]  # fmt: skip
    problems += [f"{key}: {msg}" for ok, key, msg in checks if not ok]
    return problems


def _offloaded(cfg: DapoConfig) -> str:
    kinds = [k for k in OFFLOAD_KINDS if getattr(cfg.actor.offload, k)]
    return " + ".join(kinds) if kinds else "none"


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def _memory_problems(mem: MemoryPlan) -> tuple[list[str], list[str]]:
    problems, warnings = [], []
    for ph in mem.phases:
        over = ph.total - mem.gpu_bytes
        if over > 0:
            problems.append(
                f"{ph.name} phase needs {_gib(ph.total)} GiB per GPU, {_gib(over)} GiB more than the "
                f"{_gib(mem.gpu_bytes)} GiB device"
            )
        elif -over < TIGHT_FRACTION * mem.gpu_bytes:
            warnings.append(f"{ph.name} phase leaves only {_gib(-over)} GiB headroom: allocator fragmentation may OOM")
    v = mem.vllm
    one_seq = v.max_model_len * v.kv_per_token
    if v.kv_available < one_seq:
        problems.append(
            f"vLLM KV cache: {_gib(max(v.kv_available, 0))} GiB left in the {_gib(v.budget)} GiB budget after weights "
            f"{_gib(v.weights)}, activations {_gib(v.activations)} and CUDA graphs {_gib(v.cuda_graphs)}; one sequence "
            f"of {v.max_model_len} tokens needs {_gib(one_seq)} GiB (vLLM refuses to start)"
        )
    elif v.full_length_seqs < v.max_num_seqs:
        warnings.append(
            f"vLLM KV cache holds {v.full_length_seqs} sequences of {v.max_model_len} tokens at once "
            f"(rollout.max_num_seqs={v.max_num_seqs}): long responses will queue or be preempted"
        )
    return problems, warnings


def make_plan(cfg: DapoConfig, shape: ModelShape, cluster: Cluster, assumptions: Assumptions) -> Plan:
    """Estimates, problems and warnings for one (config, model, cluster); no suggestions."""
    d = cfg.data
    mem = estimate_memory(
        cfg,
        shape,
        world_size=cluster.world_size,
        gpu_bytes=cluster.gpu_bytes,
        reserve_bytes=int(assumptions.reserve_gib * GiB),
    )
    prompt = assumptions.mean_prompt_tokens
    response = assumptions.mean_response_tokens
    cost = estimate_cost(
        cfg,
        shape,
        world_size=cluster.world_size,
        mean_prompt_tokens=d.max_prompt_length / 2 if prompt is None else prompt,
        mean_response_tokens=d.max_response_length / 2 if response is None else response,
        gen_rounds=assumptions.gen_rounds,
        peak_tflops=assumptions.peak_tflops,
        train_mfu=assumptions.train_mfu,
        gen_mfu=assumptions.gen_mfu,
    )
    problems = _layout_problems(cfg, shape, cluster)
    mem_problems, warnings = _memory_problems(mem)
    plan = Plan(cfg, shape, cluster, mem, cost, problems + mem_problems, warnings)
    rollout = mem.phase("rollout")
    if not mem_problems and mem.gpu_bytes - rollout.total < TIGHT_FRACTION * mem.gpu_bytes:
        util = _fit_utilization(cfg, plan)
        if util:
            plan.warnings.append(
                f"for {TIGHT_FRACTION:.0%} headroom in the rollout phase set {_format_overrides(util)}"
            )
    return plan


# ------------------------------------------------------------------- suggestions
def with_overrides(cfg: DapoConfig, overrides: dict[str, Any]) -> DapoConfig:
    """A deep copy of ``cfg`` with dotted keys set (keys come from this module, never users)."""
    new = copy.deepcopy(cfg)
    for key, value in overrides.items():
        parent, _, last = key.rpartition(".")
        node = get_path(new, parent) if parent else new
        if not hasattr(node, last):
            raise KeyError(f"no config key {key}")
        setattr(node, last, value)
    return new


def _powers_of_two(limit: int) -> list[int]:
    return [1 << i for i in range(int(math.log2(limit)) + 1)] if limit >= 1 else []


def _candidates(cfg: DapoConfig, shape: ModelShape, cluster: Cluster) -> list[dict[str, Any]]:
    """Single changes in order of preference (cheapest for throughput first)."""
    a, p, r = cfg.actor, cfg.actor.parallel, cfg.rollout
    out: list[dict[str, Any]] = []
    # Offload first: a host round trip of the actor's state per step costs seconds, next to
    # steps of minutes, and changes nothing else about the run (verl's recipe offloads all three).
    offload: dict[str, Any] = {}
    for kind in ("optimizer", "grads", "params"):  # largest saving per byte moved first
        if not getattr(a.offload, kind):
            offload[f"actor.offload.{kind}"] = True
            out.append(dict(offload))
    if a.recompute != "full":
        out.append({"actor.recompute": "full"})
    seq = cfg.data.max_prompt_length + cfg.data.max_response_length
    if a.use_dynamic_bsz:
        budget = a.max_tokens_per_micro_batch // 2
        while budget > seq:
            out.append({"actor.max_tokens_per_micro_batch": budget})
            budget //= 2
        if a.max_tokens_per_micro_batch > seq:
            out.append({"actor.max_tokens_per_micro_batch": seq})
    cur = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size)
    layouts = [
        (tp, pp)
        for tp in _powers_of_two(cluster.gpus_per_node)
        for pp in range(1, min(shape.num_layers, 16) + 1)
        if (tp, pp) != cur and shape.num_layers % pp == 0 and cluster.world_size % (tp * pp) == 0
    ]
    # nearest layouts first: change one of TP/PP before both, and by the smallest factor
    layouts.sort(
        key=lambda lay: ((lay[0] != cur[0]) + (lay[1] != cur[1]), abs(math.log2(lay[0] * lay[1] / (cur[0] * cur[1]))))
    )
    for tp, pp in layouts:
        out.append(
            {
                "actor.parallel.tensor_model_parallel_size": tp,
                "actor.parallel.pipeline_model_parallel_size": pp,
                "actor.parallel.sequence_parallel": tp > 1,
            }
        )
    for tr in _powers_of_two(cluster.gpus_per_node):
        if tr != r.tensor_model_parallel_size and shape.num_attention_heads % tr == 0:
            out.append({"rollout.tensor_model_parallel_size": tr})
    return out


def _fit_utilization(cfg: DapoConfig, plan: Plan) -> dict[str, Any]:
    """Lower gpu_memory_utilization so the rollout phase leaves TIGHT_FRACTION headroom, if that helps."""
    rollout = plan.memory.phase("rollout")
    others = rollout.total - rollout.items["vLLM budget"]
    util = math.floor(100 * ((1 - TIGHT_FRACTION) * plan.memory.gpu_bytes - others) / plan.memory.gpu_bytes) / 100
    if 0 < util < cfg.rollout.gpu_memory_utilization:
        return {"rollout.gpu_memory_utilization": util}
    return {}


def _try(
    cfg: DapoConfig, shape: ModelShape, cluster: Cluster, assumptions: Assumptions, overrides: dict[str, Any]
) -> tuple[Plan, dict[str, Any]] | None:
    """Re-plan with ``overrides`` (plus a fitted gpu_memory_utilization when that helps); None if still infeasible."""
    new = with_overrides(cfg, overrides)
    plan = make_plan(new, shape, cluster, assumptions)
    if not plan.feasible:
        util = _fit_utilization(new, plan)
        if util:
            overrides = {**overrides, **util}
            plan = make_plan(with_overrides(new, util), shape, cluster, assumptions)
    return (plan, overrides) if plan.feasible else None


def _format_overrides(overrides: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        return str(v).lower() if isinstance(v, bool) else str(v)

    return " ".join(f"{k}={fmt(v)}" for k, v in overrides.items())


def suggest(
    cfg: DapoConfig, shape: ModelShape, cluster: Cluster, assumptions: Assumptions, limit: int = 3
) -> list[str]:
    """Override sets that make an infeasible plan feasible: single changes, then pairs, then more nodes.

    A set that only adds keys to one already found is dropped: the smaller change is enough.
    """
    found: list[dict[str, Any]] = []

    def add(overrides: dict[str, Any]) -> bool:
        if not any(f.items() <= overrides.items() for f in found):
            found.append(overrides)
        return len(found) >= limit

    util_only = _try(cfg, shape, cluster, assumptions, {})
    if util_only:
        add(util_only[1])
    singles = _candidates(cfg, shape, cluster)
    for cand in singles:
        hit = _try(cfg, shape, cluster, assumptions, cand)
        if hit and add(hit[1]):
            break
    if not found:
        for i, first in enumerate(singles):
            for second in singles[i + 1 :]:
                if set(first) & set(second):
                    continue
                hit = _try(cfg, shape, cluster, assumptions, {**first, **second})
                if hit and add(hit[1]):
                    break
            if len(found) >= limit:
                break
    if found:
        return [_format_overrides(f) for f in found]
    for factor in (2, 4, 8, 16, 32, 64):
        bigger = Cluster(cluster.nodes * factor, cluster.gpus_per_node, cluster.gpu_memory_gib)
        base = {"trainer.nnodes": bigger.nodes}
        for cand in [{}, *_candidates(cfg, shape, bigger)]:
            hit = _try(cfg, shape, bigger, assumptions, {**base, **cand})
            if hit:
                rest = {k: v for k, v in hit[1].items() if k != "trainer.nnodes"}
                extra = f" with {_format_overrides(rest)}" if rest else ""
                return [f"--nodes {bigger.nodes} (use at least {bigger.nodes} nodes){extra}"]
    return ["no single or paired change of parallelism, recompute, micro-batch budget or vLLM memory fits this "
            f"model on up to {cluster.nodes * 64} nodes of {cluster.gpus_per_node} x {cluster.gpu_memory_gib:g} GiB: "
            "use GPUs with more memory"]  # fmt: skip


# --------------------------------------------------------------------------- output
def _fmt_count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,.0f}"


def _fmt_seconds(s: float) -> str:
    if s < 10:
        return f"{s:.2g} s"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def format_plan(plan: Plan, assumptions: Assumptions) -> str:
    cfg, shape, cl, mem, cost = plan.cfg, plan.shape, plan.cluster, plan.memory, plan.cost
    p, r = cfg.actor.parallel, cfg.rollout
    lines = [
        "dapo-megatron preflight plan",
        f"  model    {_fmt_count(shape.total_params())} params: {shape.num_layers} layers, hidden {shape.hidden_size}, "
        f"heads {shape.num_attention_heads}/{shape.num_query_groups} kv, ffn {shape.ffn_hidden_size}, "
        f"vocab {shape.vocab_size}, {'tied' if shape.tie_word_embeddings else 'untied'}",
        f"  cluster  {cl.nodes} node(s) x {cl.gpus_per_node} GPUs = {cl.world_size}, {cl.gpu_memory_gib:g} GiB each",
        f"  actor    TP{p.tensor_model_parallel_size} x PP{p.pipeline_model_parallel_size} x DP{mem.dp}"
        f" (SP {'on' if p.sequence_parallel else 'off'}, recompute {cfg.actor.recompute}, "
        f"{cfg.actor.params_dtype}, {_fmt_count(mem.actor.params)} params on the largest rank)",
        f"           micro-batch {mem.micro_batch_tokens} tokens, up to {mem.micro_batches} micro-batches per DP rank "
        "per optimizer step",
        f"  rollout  TP{r.tensor_model_parallel_size} x {max(cl.world_size // r.tensor_model_parallel_size, 1)} "
        f"replicas, gpu_memory_utilization {r.gpu_memory_utilization}, engine sleep "
        f"{f'level {r.sleep_level}' if mem.engine_sleeps else 'off'}",
        f"  offload  {_offloaded(cfg)} (actor.offload.*: to host memory outside the train phase)",
        "",
        "per-GPU memory (GiB)",
    ]
    names = [ph.name for ph in mem.phases]
    rows: list[str] = []
    for ph in mem.phases:
        rows += [k for k in ph.items if k not in rows]
    lines.append(f"  {'':32}" + "".join(f"{n:>13}" for n in names))
    for row in rows:
        cells = [ph.items.get(row) for ph in mem.phases]
        if all(c in (None, 0) for c in cells):
            continue
        lines.append(f"  {row:32}" + "".join(f"{'-' if c is None else _gib(c):>13}" for c in cells))
    lines.append(f"  {'total':32}" + "".join(f"{_gib(ph.total):>13}" for ph in mem.phases))
    lines.append(f"  {'headroom':32}" + "".join(f"{_gib(mem.gpu_bytes - ph.total):>13}" for ph in mem.phases))
    v = mem.vllm
    lines += [
        "",
        f"vLLM budget {_gib(v.budget)} GiB = weights {_gib(v.weights)} + activations {_gib(v.activations)}"
        f" + CUDA graphs {_gib(v.cuda_graphs)} + KV cache {_gib(max(v.kv_available, 0))}",
        f"  KV {v.kv_per_token / 1024:.1f} KiB/token -> {v.kv_tokens:,} tokens = {v.full_length_seqs} sequences of "
        f"{v.max_model_len} tokens (max_num_seqs {v.max_num_seqs} at full length needs {_gib(v.kv_needed_full)} GiB)",
        f"  engine sleep frees {_gib(mem.sleep_frees)} GiB while the actor trains"
        + ("" if mem.engine_sleeps else " (rollout.free_cache_engine=false: the engine keeps its budget)"),
    ]
    prompt = cost.trained_tokens / max(cfg.data.train_batch_size * r.n, 1)
    lines += [
        "",
        f"cost per step (mean sequence {prompt:.0f} tokens, {assumptions.gen_rounds:g} generation round(s); "
        "--mean-prompt-tokens/--mean-response-tokens/--gen-rounds)",
        f"  train       {cost.trained_tokens:,} tokens, {cost.train_flops:.3g} FLOPs + old log-probs "
        f"{cost.logprob_flops:.3g} -> {_fmt_seconds(cost.train_seconds)} at {assumptions.train_mfu:.0%} MFU "
        f"of {assumptions.peak_tflops:g} TFLOP/s",
        f"  generation  {cost.generated_tokens:,} tokens, {cost.gen_flops:.3g} FLOPs -> "
        f"{_fmt_seconds(cost.gen_seconds)} at {assumptions.gen_mfu:.0%} MFU "
        f"({cost.generated_tokens / max(cost.gen_seconds, 1e-9) / cl.world_size:,.0f} tokens/s/GPU)",
        f"  step        ~{_fmt_seconds(cost.step_seconds)}",
        "",
    ]
    tight = min(mem.phases, key=lambda ph: mem.gpu_bytes - ph.total)
    if plan.feasible:
        lines.append(f"verdict: FEASIBLE (tightest phase: {tight.name}, {_gib(mem.gpu_bytes - tight.total)} GiB free)")
    else:
        lines.append("verdict: INFEASIBLE")
        lines += [f"  - {prob}" for prob in plan.problems]
    for w in plan.warnings:
        lines.append(f"warning: {w}")
    for s in plan.suggestions:
        lines.append(f"suggestion: {s}")
    return "\n".join(lines)
