"""Supervised warm-up of a tiny policy, through the same Megatron actor DAPO trains.

Why reuse the DAPO update for supervised learning: at the first (and only)
optimizer step on a batch, with old log-probs equal to the current ones, the
ratio is exactly 1, no clip binds, and the gradient of ``-A * ratio`` with A = 1
is ``-grad log p``: the token-mean negative log-likelihood gradient, exactly.
So the warm-up exercises the production path (micro-batching, global token-mean,
DDP, distributed optimizer, TP) instead of a side implementation.

Run under torchrun: ``torchrun --nproc-per-node 2 -m dapo_megatron.sft --config
configs/tiny_cpu.yaml --init-model DIR --out DIR --steps 300``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from dapo_megatron.config import DapoConfig, load_config
from dapo_megatron.distributed import all_sum

logger = logging.getLogger(__name__)


def sft_batch(records, tokenizer, max_response_length: int, pad_id: int):
    """Prompt + reference solution + eos per row, the loss on the solution tokens only."""
    from dapo_megatron.actor.micro_batch import ActorBatch

    eos = tokenizer.eos_token_id
    prompts = [list(r.prompt_ids) for r in records]
    answers = []
    for r in records:
        ids = tokenizer(r.extra_info["solution"], add_special_tokens=False)["input_ids"] + [eos]
        if len(ids) > max_response_length:
            raise ValueError(f"solution of {r.uid} has {len(ids)} tokens > max_response_length {max_response_length}")
        answers.append(ids)
    seq = [p + a for p, a in zip(prompts, answers, strict=True)]
    width = max(len(s) for s in seq)
    input_ids = torch.full((len(seq), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seq), max_response_length), dtype=torch.bool)
    for i, (s, a) in enumerate(zip(seq, answers, strict=True)):
        input_ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(a)] = True
    return ActorBatch(
        input_ids=input_ids,
        seq_lengths=torch.tensor([len(s) for s in seq]),
        prompt_lengths=torch.tensor([len(p) for p in prompts]),
        response_mask=mask,
        advantages=torch.ones(len(seq)),
        group_size=1,
    )


def export_hf(actor, hf_config, tokenizer, out_dir: Path) -> None:
    """Write the actor as a Hugging Face checkpoint (rank 0 writes; collective)."""
    from safetensors.torch import save_file

    from dapo_megatron.weight_sync.gather import iter_actor_hf_weights

    tensors = {name: t.detach().clone().contiguous() for name, t in iter_actor_hf_weights(actor.model, hf_config)}
    if dist.get_rank() == 0:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            import shutil

            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    dist.barrier()


def run_sft(cfg: DapoConfig, init_model: str, out_dir: Path, *, steps: int, batch_prompts: int, lr: float) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    from dapo_megatron.actor.actor import MegatronActor
    from dapo_megatron.actor.parallel import init_parallel
    from dapo_megatron.data.parquet_dataset import load_prompt_dataset
    from dapo_megatron.data.sampler import ResumableSampler

    par = cfg.actor.parallel
    init_parallel(par.tensor_model_parallel_size, par.pipeline_model_parallel_size, seed=cfg.actor.seed)
    random.seed(cfg.trainer.seed)
    torch.manual_seed(cfg.trainer.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.data.tokenizer_path or init_model)
    hf_config = AutoConfig.from_pretrained(init_model)
    train = load_prompt_dataset(cfg.data.train_files, tokenizer, max_prompt_length=cfg.data.max_prompt_length)
    actor_cfg = dataclasses.replace(
        cfg.actor,
        ppo_mini_batch_size=batch_prompts,
        ppo_epochs=1,
        entropy_coeff=0.0,
        optim=dataclasses.replace(
            cfg.actor.optim, lr=lr, lr_warmup_steps=min(20, steps // 10), lr_decay_style="cosine"
        ),
    )
    algo_cfg = dataclasses.replace(cfg.algorithm, loss_agg_mode="token-mean")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    actor = MegatronActor(
        actor_cfg, algo_cfg, hf_config, weights=init_model, total_training_steps=steps, pad_token_id=pad_id
    )
    from megatron.core import parallel_state as ps

    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    if batch_prompts % dp_size:
        raise ValueError(f"--batch-prompts {batch_prompts} is not divisible by data-parallel size {dp_size}")
    sampler = ResumableSampler(len(train), seed=cfg.data.seed + 1)
    per_rank = batch_prompts // dp_size
    t0 = time.perf_counter()
    nll = float("nan")
    for step in range(1, steps + 1):
        idx = sampler.next_batch(batch_prompts)[dp_rank * per_rank : (dp_rank + 1) * per_rank]
        batch = sft_batch([train[i] for i in idx], tokenizer, cfg.data.max_response_length, pad_id)
        old, _ = actor.compute_log_probs(batch, compute_entropy=False)
        batch = dataclasses.replace(batch, old_log_probs=old)
        metrics = actor.update(batch)
        nll_sum, tokens = all_sum(
            [float(-(old * batch.response_mask).sum()), float(batch.response_mask.sum())],
            group=ps.get_data_parallel_group(),
        )
        nll = nll_sum / tokens
        if dist.get_rank() == 0 and (step % 25 == 0 or step == 1 or step == steps):
            print(f"[sft] step {step}/{steps} nll {nll:.4f} lr {metrics['actor/lr']:.2e}", flush=True)
    export_hf(actor, hf_config, tokenizer, out_dir)
    return {"sft/nll": nll, "sft/seconds": time.perf_counter() - t0, "sft/steps": float(steps)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Supervised warm-up through the Megatron actor (torchrun)")
    parser.add_argument("--config", required=True)
    parser.add_argument("--init-model", required=True, help="HF directory of the (random) starting model")
    parser.add_argument("--out", required=True, help="HF directory to write the warmed-up model to")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-prompts", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = load_config(args.config, args.overrides)
    result = run_sft(
        cfg, args.init_model, Path(args.out), steps=args.steps, batch_prompts=args.batch_prompts, lr=args.lr
    )
    if dist.get_rank() == 0:
        print(f"[sft] done: {result}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
