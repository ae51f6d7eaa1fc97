"""Preflight planner CLI: will this config fit this cluster, and what will a step cost?

Usage::

    python -m dapo_megatron.plan --config configs/dapo_qwen2.5_32b.yaml [key=value ...] \\
        --nodes 16 --gpus-per-node 8 --gpu-memory-gb 80 [--model-config configs/models/qwen2.5-32b.json]

Exit codes: 0 feasible (possibly with warnings), 1 infeasible (reasons and suggested
overrides printed), 2 bad input (config, model config or arguments).

``--nodes`` / ``--gpus-per-node`` describe the cluster to plan for and become
``trainer.nnodes`` / ``trainer.n_gpus_per_node``, so the same config can be planned for
other cluster sizes; the launcher passes the same overrides to the trainer.
The planner itself is :mod:`dapo_megatron.planning`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dapo_megatron.config import ConfigError, load_config
from dapo_megatron.planning.feasibility import Assumptions, Cluster, format_plan, make_plan, suggest
from dapo_megatron.planning.memory import load_model_shape

EXIT_FEASIBLE, EXIT_INFEASIBLE, EXIT_BAD_INPUT = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m dapo_megatron.plan",
        description="Check a DAPO config against a cluster: layout, per-GPU memory per phase, cost per step. "
        "Exit 0 feasible, 1 infeasible, 2 bad input.",
    )
    ap.add_argument("--config", required=True, help="YAML config")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides, as for the trainer")
    ap.add_argument("--nodes", type=int, help="nodes (default: trainer.nnodes)")
    ap.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: trainer.n_gpus_per_node)")
    ap.add_argument("--gpu-memory-gb", type=float, required=True, help="memory per GPU in GiB (H800/H100: 80)")
    ap.add_argument("--model-config", help="HF config.json or its directory (default: actor.model_path)")
    ap.add_argument("--mfu", type=float, default=0.35, help="training model-FLOPs utilisation (default 0.35)")
    ap.add_argument("--gen-mfu", type=float, default=0.10, help="generation FLOPs utilisation (default 0.10)")
    ap.add_argument("--gpu-tflops", type=float, default=989.0, help="peak dense bf16 TFLOP/s per GPU (H800: 989)")
    ap.add_argument("--mean-prompt-tokens", type=float, help="mean prompt length (default max_prompt_length/2)")
    ap.add_argument("--mean-response-tokens", type=float, help="mean response length (default max_response_length/2)")
    ap.add_argument("--gen-rounds", type=float, default=1.0, help="generation rounds per step (dynamic sampling)")
    ap.add_argument("--reserve-gb", type=float, default=1.0, help="per-GPU CUDA context + NCCL reserve, GiB")
    return ap


def _check_args(args: argparse.Namespace) -> list[str]:
    bad = []
    for name in ("nodes", "gpus_per_node"):
        value = getattr(args, name)
        if value is not None and value < 1:
            bad.append(f"--{name.replace('_', '-')}: must be >= 1, got {value}")
    for name in ("gpu_memory_gb", "gpu_tflops", "gen_rounds"):
        if getattr(args, name) <= 0:
            bad.append(f"--{name.replace('_', '-')}: must be > 0, got {getattr(args, name)}")
    for name in ("mfu", "gen_mfu"):
        if not 0 < getattr(args, name) <= 1:
            bad.append(f"--{name.replace('_', '-')}: must be in (0, 1], got {getattr(args, name)}")
    if args.reserve_gb < 0:
        bad.append(f"--reserve-gb: must be >= 0, got {args.reserve_gb}")
    for name in ("mean_prompt_tokens", "mean_response_tokens"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            bad.append(f"--{name.replace('_', '-')}: must be > 0, got {getattr(args, name)}")
    return bad


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bad = _check_args(args)
    if bad:
        print("error: " + "; ".join(bad), file=sys.stderr)
        return EXIT_BAD_INPUT
    overrides = list(args.overrides)
    if args.nodes is not None:
        overrides.append(f"trainer.nnodes={args.nodes}")
    if args.gpus_per_node is not None:
        overrides.append(f"trainer.n_gpus_per_node={args.gpus_per_node}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    model_config = args.model_config or cfg.actor.model_path
    if model_config is None:
        print("error: no model config: pass --model-config or set actor.model_path", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        shape = load_model_shape(model_config)
    except (FileNotFoundError, ValueError) as exc:
        hint = "" if args.model_config else " (from actor.model_path; pass --model-config to plan without weights)"
        print(f"error: {exc}{hint}", file=sys.stderr)
        return EXIT_BAD_INPUT
    cluster = Cluster(cfg.trainer.nnodes, cfg.trainer.n_gpus_per_node, args.gpu_memory_gb)
    assumptions = Assumptions(
        reserve_gib=args.reserve_gb,
        train_mfu=args.mfu,
        gen_mfu=args.gen_mfu,
        peak_tflops=args.gpu_tflops,
        mean_prompt_tokens=args.mean_prompt_tokens,
        mean_response_tokens=args.mean_response_tokens,
        gen_rounds=args.gen_rounds,
    )
    plan = make_plan(cfg, shape, cluster, assumptions)
    if not plan.feasible:
        plan.suggestions = suggest(cfg, shape, cluster, assumptions)
    print(format_plan(plan, assumptions))
    return EXIT_FEASIBLE if plan.feasible else EXIT_INFEASIBLE


if __name__ == "__main__":
    sys.exit(main())
