"""Model + distributed-optimizer checkpoint round trip under torchrun (2 ranks: DP=2, gloo).

Usage::

    torchrun --nproc_per_node=2 ckpt_optim_worker.py --hf-dir HF --root DIR

Takes two Adam steps (weight decay, gradient clipping), saves model + optimizer in both
optimizer formats (``fully_reshardable``, the default, and the legacy ``dp_reshardable``),
takes two more; then for each format a fresh model/optimizer loads the checkpoint and takes
the same two steps: every parameter must match bit for bit (Adam moments and step counts
restored).  Prints ``OPTIM-OK <format>`` on rank 0 per format, and ``MODEL-WRITERS rank:chunks ...``:
how many model-weight chunks each rank wrote (the save is spread over the DP replicas).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def build(cfg, hf_dir: str):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from dapo_megatron.actor.hf_loading import load_hf_weights_into_model
    from dapo_megatron.actor.model import build_gpt_model

    model = build_gpt_model(cfg)
    load_hf_weights_into_model(model, hf_dir, cfg)
    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True),
        module=model,
    )
    opt = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=1e-2,
            weight_decay=0.1,
            clip_grad=0.5,
            use_distributed_optimizer=True,
            params_dtype=torch.float32,
        ),
        [ddp],
    )
    return ddp, opt


def train_step(ddp, opt, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + dist.get_rank())
    tokens = torch.randint(0, ddp.module.hf_vocab_size, (2, 12), generator=gen)
    s = tokens.shape[1]
    ddp.zero_grad_buffer()
    opt.zero_grad()
    out = ddp(
        input_ids=tokens,
        position_ids=torch.arange(s).unsqueeze(0).expand_as(tokens),
        attention_mask=torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1),
    )
    out[..., : ddp.module.hf_vocab_size].float().pow(2).mean().backward()
    ddp.finish_grad_sync()
    ok, _, _ = opt.step()
    assert ok


def model_writers(step_root: Path) -> dict[int, int]:
    """Per writing rank, how many model-weight chunks its files hold (from the DCP metadata)."""
    import re

    from torch.distributed.checkpoint import FileSystemReader

    from dapo_megatron.checkpoint.layout import find_latest

    meta = FileSystemReader(str(find_latest(step_root))).read_metadata()
    counts: dict[int, int] = {}
    for index, info in meta.storage_data.items():
        if index.fqn.startswith("optimizer.") or "_extra_state" in index.fqn:
            continue
        rank = int(re.match(r"__(\d+)_", info.relative_path).group(1))
        counts[rank] = counts.get(rank, 0) + 1
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf-dir", required=True)
    ap.add_argument("--root", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from transformers import AutoConfig

    from dapo_megatron.actor.parallel import destroy_parallel, init_parallel
    from dapo_megatron.checkpoint.training import load_checkpoint, save_checkpoint

    cfg = AutoConfig.from_pretrained(args.hf_dir)
    init_parallel(1, 1, seed=0)  # DP=2
    ddp, opt = build(cfg, args.hf_dir)
    for seed in (1, 2):
        train_step(ddp, opt, seed=seed)
    formats = ("fully_reshardable", "dp_reshardable")
    for sharding in formats:
        save_checkpoint(
            Path(args.root) / sharding, 2, ddp, cfg, optimizer=opt, extra_state={"step": 2}, optimizer_sharding=sharding
        )
    if dist.get_rank() == 0:
        writers = model_writers(Path(args.root) / "fully_reshardable")
        print(f"MODEL-WRITERS {' '.join(f'{r}:{n}' for r, n in sorted(writers.items()))}", flush=True)
    for seed in (3, 4):
        train_step(ddp, opt, seed=seed)
    want = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}

    for sharding in formats:
        ddp2, opt2 = build(cfg, args.hf_dir)  # fresh weights from HF, fresh Adam state
        assert load_checkpoint(Path(args.root) / sharding, ddp2, cfg, optimizer=opt2) == {"step": 2}
        for seed in (3, 4):
            train_step(ddp2, opt2, seed=seed)
        got = dict(ddp2.module.named_parameters())
        bad = [n for n in want if not torch.equal(want[n], got[n].detach())]
        if bad:
            diffs = {n: (want[n] - got[n].detach()).abs().max().item() for n in bad}
            raise AssertionError(f"{sharding}: parameters differ after the resumed step: {diffs}")
        dist.barrier()
        if dist.get_rank() == 0:
            print(f"OPTIM-OK {sharding}", flush=True)
    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
