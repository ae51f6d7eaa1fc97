"""Supervised warm-up of a tiny policy, through the same Megatron actor DAPO trains.

Why reuse the DAPO update for supervised learning: an on-policy update (one optimizer
step per batch, no old log-probs: the actor takes the forward's own, detached) has
ratio exactly 1, no clip binds, and the gradient of ``-A * ratio`` with A = 1 is
``-grad log p``: the token-mean negative log-likelihood gradient, exactly.
So the warm-up exercises the production path (micro-batching, global token-mean,
DDP, distributed optimizer, TP) instead of a side implementation.

Why it can stop on a measured target (``--target-band LOW HIGH``): a fixed number of
steps at a high learning rate is chaotic in floating point. The same 600 steps gave
held-out accuracy 0.249 on one CPU and 0.071 on another (different kernels round
differently), and DAPO cannot learn from a policy that almost never solves a problem.
So every ``--eval-every`` steps the actor's weights go to a colocated vLLM engine
through the production weight sync and the held-out set is scored avg@k exactly as
the DAPO trainer's validation does (same sampling, same seed); the warm-up stops at
the first evaluation inside the band, whatever the machine's rounding did to the
path there. ``--steps`` is the cap; the band never reached is an error that says so.

Run under torchrun: ``torchrun --nproc-per-node 2 launch/sft.py --config
configs/tiny_cpu.yaml --init-model DIR --out DIR --steps 1200 --target-band 0.2 0.4``
(``-m dapo_megatron.sft`` works too, but its reward workers would re-import this module).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from transformers import AutoConfig, AutoTokenizer

from dapo_megatron.actor.actor import MegatronActor
from dapo_megatron.actor.parallel import init_parallel
from dapo_megatron.checkpoint.hf_writer import ShardedSafetensorsWriter
from dapo_megatron.config import DapoConfig, load_config
from dapo_megatron.contract import ActorBatch, PromptRecord
from dapo_megatron.data.parquet_dataset import load_prompt_dataset
from dapo_megatron.data.sampler import ResumableSampler
from dapo_megatron.distributed import all_sum
from dapo_megatron.experience import pack_sequences
from dapo_megatron.reward.pool import RewardPool
from dapo_megatron.reward.val_metrics import held_out_accuracy as mean_accuracy
from dapo_megatron.rollout.vllm_engine import VllmEngine
from dapo_megatron.torch_dtypes import torch_dtype
from dapo_megatron.validation import validate
from dapo_megatron.weight_sync.gather import iter_actor_hf_weights
from dapo_megatron.weight_sync.sync import EngineWeightSync

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class WarmupTarget:
    """Stop the warm-up at the first held-out evaluation with ``low <= avg@k <= high``.

    ``low`` keeps DAPO's groups informative (a policy that solves almost nothing gives
    groups of all-zero rewards, which carry no gradient); ``high`` leaves it room to grow.
    """

    low: float = 0.20
    high: float = 0.40
    # Every 25 steps: near the band the demo's held-out accuracy can rise by 0.17 in 50 steps,
    # which could step over the band. Below half the band's bottom the next evaluation waits
    # twice as long: there the demo's policy gains about 0.01 per 25 steps, and each
    # evaluation costs as much as ~25 training steps. None before first_eval: in the eight
    # configurations of bench/RESULTS.md's robustness table the policy solved under 8 % up
    # to step 500 and the earliest stop was step 675; from step 500 on they are evaluated
    # on the same steps as with a first evaluation at 200, so they stop on the same step.
    eval_every: int = 25
    first_eval: int = 500
    # The learning rate follows a cosine over decay_steps down to min_lr and stays there:
    # the schedule does not depend on the cap, and a machine whose warm-up is slower to
    # reach the band keeps learning (on the demo's task held-out accuracy rises fastest
    # while the rate anneals) instead of stalling at zero.
    decay_steps: int = 600
    min_lr: float = 5e-4
    # Decoupled weight decay (AdamW; Megatron spares biases and norms). Without it some
    # seeds memorise the training problems and stall near 0.07 held-out accuracy on the
    # floor rate; with 0.1 and the 5e-4 floor the same seeds keep generalising into the
    # band (bench/RESULTS.md, "Robustness of the demo").
    weight_decay: float = 0.1
    # Measurement only (bench/RESULTS.md): after writing the model at the stop, go on
    # training and evaluating up to this step, to compare with a fixed-length warm-up.
    measure_until: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.low <= self.high <= 1.0:
            raise ValueError(f"target band must satisfy 0 <= low <= high <= 1, got [{self.low}, {self.high}]")
        if self.weight_decay < 0:
            raise ValueError(f"weight decay must be >= 0, got {self.weight_decay}")
        if self.eval_every < 1 or self.first_eval < 0:
            raise ValueError(f"need eval_every >= 1 and first_eval >= 0, got {self.eval_every}, {self.first_eval}")

    def first_evaluation(self) -> int:
        """The first multiple of ``eval_every`` at or after ``first_eval`` (and after step 0)."""
        return -(-max(self.first_eval, 1) // self.eval_every) * self.eval_every

    def next_evaluation(self, step: int, acc: float) -> int:
        """Where to evaluate after ``acc`` at ``step``: twice as far below half the band's bottom."""
        return step + self.eval_every * (1 if acc >= self.low / 2 else 2)


class WarmupTargetNotReached(RuntimeError):
    """The step cap came before held-out accuracy entered the band."""


def held_out_accuracy(metrics: dict[str, float]) -> float:
    """The mean over data sources of ``val-core/<source>/acc/mean@k`` (what the demo summary reports)."""
    value = mean_accuracy(metrics)
    if value is None:
        raise ValueError(f"validation returned no val-core/<source>/acc/mean@k metric: {sorted(metrics)}")
    return value


def sft_batch(records: Sequence[PromptRecord], tokenizer, max_response_length: int, pad_id: int) -> ActorBatch:
    """Prompt + reference solution + eos per row, the loss on the solution tokens only."""
    answers = []
    for r in records:
        ids = tokenizer(r.extra_info["solution"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) > max_response_length:
            raise ValueError(f"solution of {r.uid} has {len(ids)} tokens > max_response_length {max_response_length}")
        answers.append(ids)
    prompts = [r.prompt_ids for r in records]
    advantages = torch.ones(len(answers))
    width = max_response_length
    return pack_sequences(prompts, answers, response_width=width, pad_token_id=pad_id, advantages=advantages)


def export_hf(actor, hf_config, tokenizer, out_dir: Path, info: dict | None = None) -> None:
    """Write the actor as a Hugging Face checkpoint (rank 0 writes; collective).

    ``info`` goes to ``warmup.json`` beside the weights: how the warm-up ended.
    """
    tensors = {name: t.detach().clone().contiguous() for name, t in iter_actor_hf_weights(actor.model, hf_config)}
    if dist.get_rank() == 0:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        writer = ShardedSafetensorsWriter(tmp, [list(tensors)], {n: (t.shape, t.dtype) for n, t in tensors.items()})
        for name, t in tensors.items():
            writer.add(name, t)
        writer.finish()  # one shard: model.safetensors
        hf_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if info is not None:
            (tmp / "warmup.json").write_text(json.dumps(info, indent=1) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    dist.barrier()


class _HeldOut:
    """Held-out avg@k of the actor's current weights, through the production rollout path.

    A colocated :class:`~dapo_megatron.rollout.vllm_engine.VllmEngine`, the weight sync and
    :func:`dapo_megatron.validation.validate`, built as the DAPO trainer builds them, so
    the number the warm-up stops on is the number DAPO's step 0 reports.
    """

    def __init__(self, cfg: DapoConfig, actor, hf_config, tokenizer, init_model: str) -> None:
        if not cfg.data.val_files:
            raise ValueError("a warm-up target needs data.val_files (the held-out set it is measured on)")
        val = load_prompt_dataset(cfg.data.val_files, tokenizer, max_prompt_length=cfg.data.max_prompt_length)
        limit = cfg.data.val_max_samples
        self.records = list(val) if limit < 0 else list(val)[:limit]
        self.cfg, self.actor, self.hf_config, self.tokenizer = cfg, actor, hf_config, tokenizer
        self.engine = VllmEngine.from_config(
            cfg.rollout, init_model, max_model_len=cfg.data.max_prompt_length + cfg.data.max_response_length
        )
        ws = cfg.rollout.weight_sync
        self.weight_sync = EngineWeightSync(
            actor.model, hf_config, self.engine, dtype=torch_dtype(cfg.rollout.dtype), bucket_size_mb=ws.bucket_size_mb
        )
        self.pool = RewardPool.from_config(cfg.reward)

    def __call__(self) -> dict[str, float]:
        self.weight_sync.sync()
        if self.cfg.rollout.weight_sync.verify:
            self.weight_sync.verify()
        return validate(self.cfg, self.engine, self.pool, self.tokenizer, self.records)

    def close(self) -> None:
        self.pool.close()


def run_sft(
    cfg: DapoConfig,
    init_model: str,
    out_dir: Path,
    *,
    steps: int,
    batch_prompts: int,
    lr: float,
    target: WarmupTarget | None = None,
    seed: int | None = None,
) -> dict:
    """Warm up for ``steps`` steps, or with a ``target`` until held-out accuracy enters its band
    (``steps`` is then the cap, and the learning-rate schedule is laid out over it).

    ``seed`` seeds torch and the order of the training problems (default: ``trainer.seed``
    and ``data.seed + 1``).
    """
    par = cfg.actor.parallel
    init_parallel(par.tensor_model_parallel_size, par.pipeline_model_parallel_size, seed=cfg.actor.seed)
    data_seed = cfg.data.seed + 1 if seed is None else seed
    seed = cfg.trainer.seed if seed is None else seed
    random.seed(seed)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.data.tokenizer_path or init_model)
    hf_config = AutoConfig.from_pretrained(init_model)
    train = load_prompt_dataset(cfg.data.train_files, tokenizer, max_prompt_length=cfg.data.max_prompt_length)
    schedule = dict(lr=lr, lr_warmup_steps=min(20, steps // 10), lr_decay_style="cosine", min_lr=0.0)
    if target is not None:
        schedule.update(lr_decay_steps=target.decay_steps, min_lr=target.min_lr, weight_decay=target.weight_decay)
    last = max(steps, target.measure_until) if target is not None else steps
    actor_cfg = dataclasses.replace(
        cfg.actor,
        ppo_mini_batch_size=batch_prompts,
        ppo_epochs=1,
        entropy_coeff=0.0,
        optim=dataclasses.replace(cfg.actor.optim, **schedule),
    )
    algo_cfg = dataclasses.replace(cfg.algorithm, loss_agg_mode="token-mean")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    actor = MegatronActor(
        actor_cfg, algo_cfg, hf_config, weights=init_model, total_training_steps=steps, pad_token_id=pad_id
    )
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    if batch_prompts % dp_size:
        raise ValueError(f"--batch-prompts {batch_prompts} is not divisible by data-parallel size {dp_size}")
    held_out = _HeldOut(cfg, actor, hf_config, tokenizer, init_model) if target is not None else None
    is_logger = dist.get_rank() == 0
    sampler = ResumableSampler(len(train), seed=data_seed)
    per_rank = batch_prompts // dp_size
    t0 = time.perf_counter()
    nll = float("nan")
    acc: float | None = None
    evals: list[tuple[int, float]] = []
    info: dict | None = None  # set when the model is written
    next_eval = target.first_evaluation() if target is not None else 0
    try:
        for step in range(1, last + 1):
            if info is not None and step > target.measure_until:
                break  # measured far enough past the stop
            idx = sampler.next_batch(batch_prompts)[dp_rank * per_rank : (dp_rank + 1) * per_rank]
            batch = sft_batch([train[i] for i in idx], tokenizer, cfg.data.max_response_length, pad_id)
            evaluate = held_out is not None and step in (next_eval, steps)
            report = step % 25 == 0 or step == 1 or step == last or evaluate
            if report:  # the batch's nll before its step: one extra forward, only when it is reported
                lp, _ = actor.compute_log_probs(batch, compute_entropy=False)
                nll_sum, tokens = all_sum(
                    [float(-(lp * batch.response_mask).sum()), float(batch.response_mask.sum())],
                    group=ps.get_data_parallel_group(),
                )
                nll = nll_sum / tokens
            metrics = actor.update(batch)  # on-policy: no old log-probs, one optimizer step
            if is_logger and report:
                print(f"[sft] step {step}/{last} nll {nll:.4f} lr {metrics['actor/lr']:.2e}", flush=True)
            if not evaluate:
                continue
            t_eval = time.perf_counter()
            # Every rank computes the same number from the gathered scores: they all stop together.
            acc = held_out_accuracy(held_out())
            evals.append((step, round(acc, 6)))
            next_eval = target.next_evaluation(step, acc)
            if is_logger:
                band = f"{target.low:.2f}-{target.high:.2f}"
                took = time.perf_counter() - t_eval
                print(f"[sft] step {step}: held-out avg@k {acc:.3f} (band {band}; {took:.1f}s)", flush=True)
            if info is None and acc >= target.low:
                if acc > target.high and is_logger:
                    print(
                        f"[sft] warning: held-out accuracy {acc:.3f} overshot the band's top {target.high:.2f} "
                        f"within {target.eval_every} steps; DAPO has less room to grow (lower --eval-every)",
                        flush=True,
                    )
                info = _warmup_info(step, steps, lr, seed, nll, acc, evals, target)
                export_hf(actor, hf_config, tokenizer, out_dir, info)
                if is_logger:
                    print(f"[sft] stopped at step {step}: held-out avg@k {acc:.3f} is in the band", flush=True)
                if target.measure_until <= step:
                    break
            if info is None and step == steps:
                raise WarmupTargetNotReached(
                    f"the warm-up reached its cap of {steps} steps with held-out accuracy {acc:.3f}, below the "
                    f"band's bottom {target.low:.2f} (evaluations: "
                    + ", ".join(f"step {s} {a:.3f}" for s, a in evals)
                    + "); DAPO does not learn from a policy that rarely solves a problem. Raise the cap "
                    "(--steps) or the learning rate (--lr); nothing was written"
                )
    finally:
        if held_out is not None:
            held_out.close()
    if info is None:
        info = _warmup_info(last, steps, lr, seed, nll, acc, evals, target)
        export_hf(actor, hf_config, tokenizer, out_dir, info)
    elif is_logger and target is not None and target.measure_until > info["steps"]:
        print(f"[sft] measured to step {last}: " + ", ".join(f"step {s} {a:.3f}" for s, a in evals), flush=True)
    seconds = time.perf_counter() - t0
    return {
        "sft/nll": info["nll"],
        "sft/seconds": seconds,
        "sft/steps": float(info["steps"]),
        "sft/held_out_acc": info["held_out_acc"],
    }


def _warmup_info(step, max_steps, lr, seed, nll, acc, evals, target: WarmupTarget | None) -> dict:
    """What ``warmup.json`` records: where the warm-up stopped and what it measured on the way."""
    return {
        "steps": step,
        "max_steps": max_steps,
        "lr": lr,
        "seed": seed,
        "nll": nll,
        "held_out_acc": acc,
        "evaluations": list(evals),
        "band": [target.low, target.high] if target is not None else None,
        "min_lr": target.min_lr if target is not None else None,
        "weight_decay": target.weight_decay if target is not None else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Supervised warm-up through the Megatron actor (torchrun)")
    parser.add_argument("--config", required=True)
    parser.add_argument("--init-model", required=True, help="HF directory of the (random) starting model")
    parser.add_argument("--out", required=True, help="HF directory to write the warmed-up model to")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-prompts", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=None, help="torch seed and data order (default trainer.seed)")
    parser.add_argument(
        "--target-band",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=None,
        help="stop at the first held-out avg@k inside [LOW, HIGH]; --steps is then the cap",
    )
    parser.add_argument("--eval-every", type=int, default=WarmupTarget.eval_every)
    parser.add_argument("--first-eval", type=int, default=WarmupTarget.first_eval, help="no evaluation before it")
    parser.add_argument("--decay-steps", type=int, default=WarmupTarget.decay_steps, help="with a target band")
    parser.add_argument("--min-lr", type=float, default=WarmupTarget.min_lr, help="with a target band")
    parser.add_argument(
        "--weight-decay", type=float, default=WarmupTarget.weight_decay, help="AdamW's, with a target band"
    )
    parser.add_argument(
        "--measure-until", type=int, default=0, help="measurement: go on training and evaluating to this step"
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = load_config(args.config, args.overrides)
    target = None
    if args.target_band:
        target = WarmupTarget(
            *args.target_band,
            eval_every=args.eval_every,
            first_eval=args.first_eval,
            decay_steps=args.decay_steps,
            min_lr=args.min_lr,
            weight_decay=args.weight_decay,
            measure_until=args.measure_until,
        )
    try:
        result = run_sft(
            cfg,
            args.init_model,
            Path(args.out),
            steps=args.steps,
            batch_prompts=args.batch_prompts,
            lr=args.lr,
            target=target,
            seed=args.seed,
        )
    except WarmupTargetNotReached as exc:
        if dist.get_rank() == 0:
            print(f"[sft] error: {exc}", flush=True)
        return 3
    if dist.get_rank() == 0:
        print(f"[sft] done: {result}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
