"""Checkpoints of an actor whose DDP has many buckets (overlapped gradient reduction).

    torchrun --nproc_per_node=2 ddp_buckets_worker.py HF_DIR ROOT

TP1 x DP2, distributed optimizer, buckets of 2000 parameters: the actor trains one update,
saves model + ``fully_reshardable`` optimizer state, and a fresh actor loads it.  With
:mod:`dapo_megatron.compat.megatron_optimizer`'s fix the loaded weights equal the saved ones bit for bit;
with the fix replaced by a no-op (megatron-core unpatched) they do not, which shows the fix is
still needed on the installed megatron-core.  The last rank prints ``BUCKETS-OK ...``.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch.distributed as dist
from actor_update_worker import actor_cfg, dp_share, make_batch

from dapo_megatron.config import AlgorithmConfig

BUCKET = 2000


def build(hf_dir, hf_config):
    from dapo_megatron.actor.actor import MegatronActor

    cfg = actor_cfg(1, 1, False, 256, dist_opt=True)
    cfg.ddp.bucket_size = BUCKET
    cfg.ppo_mini_batch_size = 2
    return MegatronActor(cfg, AlgorithmConfig(), hf_config, weights=hf_dir, temperature=0.7)


def max_diff(want, actor) -> float:
    return max((want[n] - p).abs().max().item() for n, p in actor.gpt.named_parameters())


def main(argv: list[str]) -> int:
    from transformers import AutoConfig

    import dapo_megatron.checkpoint.training as ckpt
    from dapo_megatron.actor.parallel import destroy_parallel, init_parallel

    hf_dir, root = argv[0], Path(argv[1])
    dist.init_process_group("gloo")
    init_parallel(1, 1, seed=1)
    hf_config = AutoConfig.from_pretrained(hf_dir)
    actor = build(hf_dir, hf_config)
    buckets = len(actor.model.buffers[0].buckets)
    assert buckets > 4, buckets
    share, _ = dp_share(make_batch(hf_config.vocab_size).select(range(0, 4)), 2)
    actor.update(share)
    want = {n: p.detach().clone() for n, p in actor.gpt.named_parameters()}
    diffs = {}
    fix = ckpt.fully_reshardable_bucket_fix
    for label, wrapper in (("patched", fix), ("unpatched", lambda optimizer: contextlib.nullcontext())):
        ckpt.fully_reshardable_bucket_fix = wrapper
        try:
            ckpt.save_checkpoint(root / label, 1, actor.model, hf_config, optimizer=actor.optimizer)
            fresh = build(hf_dir, hf_config)
            ckpt.load_checkpoint(root / label, fresh.model, hf_config, optimizer=fresh.optimizer)
            diffs[label] = max_diff(want, fresh)
        finally:
            ckpt.fully_reshardable_bucket_fix = fix
    assert diffs["patched"] == 0.0, diffs
    assert diffs["unpatched"] > 1e-2, f"megatron-core no longer scrambles multi-bucket state: drop the fix ({diffs})"
    if dist.get_rank() == dist.get_world_size() - 1:
        print(f"BUCKETS-OK buckets={buckets} patched={diffs['patched']:.1e} unpatched={diffs['unpatched']:.2e}")
    destroy_parallel(destroy_process_group=False)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
