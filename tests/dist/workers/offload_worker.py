"""Training with the actor's state offloaded between steps is bit-identical to training without.

Usage::

    torchrun --nproc_per_node=2 offload_worker.py HF_DIR

For each layout (TP1 x DP2 and TP2, distributed optimizer; TP1 x DP2 without it) two actors
start from the same weights and train 3 updates on the same batches.  The second offloads
params, grads and optimizer state before each log-prob pass and update (as the trainer does
around generation), checks that the device storage is really freed and that computing while
offloaded is refused, then onloads.  Losses, grad norms, log-probs and the weights after every
update must be equal bit for bit.  The last rank prints ``OFFLOAD-OK <layout> ...``.
"""

from __future__ import annotations

import dataclasses
import sys

import torch
import torch.distributed as dist
from actor_update_worker import GROUP, actor_cfg, dp_share, make_batch

from dapo_megatron.actor.offload import OFFLOAD_KINDS, ActorStateOffloadedError
from dapo_megatron.config import AlgorithmConfig

STEPS = 3
GROUPS_PER_STEP = 2


def _weights(actor) -> list[torch.Tensor]:
    return [p.detach().clone() for p in actor.gpt.parameters()]


def _train(hf_dir, hf_config, batch, tp, dist_opt, *, offload: bool):
    from dapo_megatron.actor.actor import MegatronActor

    cfg = actor_cfg(tp, 1, False, 256, dist_opt=dist_opt)
    cfg.ppo_mini_batch_size = GROUPS_PER_STEP
    actor = MegatronActor(cfg, AlgorithmConfig(), hf_config, weights=hf_dir, temperature=0.7)
    trace, freed = [], []
    for step in range(STEPS):
        rows = range(step * GROUPS_PER_STEP * GROUP, (step + 1) * GROUPS_PER_STEP * GROUP)
        share, _ = dp_share(batch.select(rows), GROUPS_PER_STEP)
        if offload:
            before = actor.offloader.resident_bytes()
            stats = actor.offload(OFFLOAD_KINDS)
            after = actor.offloader.resident_bytes()
            assert after == {k: 0 for k in OFFLOAD_KINDS}, after
            assert stats.bytes == before, (stats.bytes, before)
            for call in (actor.compute_log_probs, actor.update):
                try:
                    call(share)
                except ActorStateOffloadedError:
                    pass
                else:
                    raise AssertionError("computing with offloaded state was not refused")
            actor.onload(("params",))
            freed.append(stats.bytes)
        old, _ = actor.compute_log_probs(share, compute_entropy=False)
        if offload:
            actor.onload(("grads", "optimizer"))
        share = dataclasses.replace(share, old_log_probs=old)
        m = actor.update(share)
        trace.append((old, m["actor/pg_loss"], m["actor/grad_norm"], _weights(actor)))
    return trace, freed, actor


def check_layout(hf_dir, hf_config, batch, tp, dist_opt) -> str:
    from dapo_megatron.actor.parallel import destroy_parallel, init_parallel

    init_parallel(tp, 1, seed=1)
    try:
        plain, _, _ = _train(hf_dir, hf_config, batch, tp, dist_opt, offload=False)
        swapped, freed, actor = _train(hf_dir, hf_config, batch, tp, dist_opt, offload=True)
        for step, (a, b) in enumerate(zip(plain, swapped, strict=True)):
            assert torch.equal(a[0], b[0]), f"step {step}: log-probs differ"
            assert a[1] == b[1] and a[2] == b[2], f"step {step}: loss/grad norm {a[1:3]} != {b[1:3]}"
            assert all(torch.equal(x, y) for x, y in zip(a[3], b[3], strict=True)), f"step {step}: weights differ"
        params = sum(p.numel() * p.element_size() for p in actor.gpt.parameters())
        # params: every parameter's bytes at least (DDP pads its buffer); Adam state once it exists
        assert freed[0]["params"] >= params and freed[0]["grads"] >= params // 2, freed[0]
        assert freed[-1]["optimizer"] > freed[0]["optimizer"], freed
    finally:
        destroy_parallel(destroy_process_group=False)
    return (
        f"OFFLOAD-OK tp={tp} dp={2 // tp} dist_opt={int(dist_opt)} steps={STEPS} "
        f"freed={sum(freed[-1].values())} params={params}"
    )


def main(argv: list[str]) -> int:
    from transformers import AutoConfig

    hf_dir = argv[0]
    dist.init_process_group("gloo")
    hf_config = AutoConfig.from_pretrained(hf_dir)
    batch = make_batch(hf_config.vocab_size)
    lines = [
        check_layout(hf_dir, hf_config, batch, 1, True),
        check_layout(hf_dir, hf_config, batch, 2, True),
        check_layout(hf_dir, hf_config, batch, 1, False),
    ]
    if dist.get_rank() == dist.get_world_size() - 1:
        print("\n".join(lines), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
