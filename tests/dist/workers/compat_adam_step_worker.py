"""``fully_reshardable`` optimizer state into torch's Adam, with and without the step passthrough.

    torchrun --nproc_per_node=1 compat_adam_step_worker.py HF_DIR ROOT

One Adam step on the distributed optimizer (no Apex/TE: torch's Adam, which keeps a
per-parameter ``step``), a save in the ``fully_reshardable`` format, then two loads into fresh
optimizers: with :func:`dapo_megatron.compat.megatron_optimizer.adam_step_passthrough` (the
actor's code path) and with it replaced by a no-op, i.e. megatron-core as released.  Prints
``ADAM-STEP patched=<outcome> unpatched=<outcome>``; the bug is ``unpatched=KeyError: 'step'``.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from ckpt_optim_worker import build, train_step


def load_outcome(ckpt, root: Path, cfg, hf_dir: str) -> str:
    ddp, opt = build(cfg, hf_dir)
    try:
        ckpt.load_checkpoint(root, ddp, cfg, optimizer=opt)
    except Exception as exc:  # the outcome is the report
        return f"{type(exc).__name__}: {exc}"
    return "loaded"


def main(argv: list[str]) -> int:
    from transformers import AutoConfig

    import dapo_megatron.checkpoint.training as ckpt
    from dapo_megatron.actor.parallel import destroy_parallel, init_parallel

    hf_dir, root = argv[0], Path(argv[1])
    torch.set_num_threads(1)
    cfg = AutoConfig.from_pretrained(hf_dir)
    init_parallel(1, 1, seed=0)
    ddp, opt = build(cfg, hf_dir)
    train_step(ddp, opt, seed=1)
    ckpt.save_checkpoint(root, 1, ddp, cfg, optimizer=opt, optimizer_sharding="fully_reshardable")
    patched = load_outcome(ckpt, root, cfg, hf_dir)
    passthrough = ckpt.adam_step_passthrough
    ckpt.adam_step_passthrough = contextlib.nullcontext
    try:
        unpatched = load_outcome(ckpt, root, cfg, hf_dir)
    finally:
        ckpt.adam_step_passthrough = passthrough
    if dist.get_rank() == 0:
        print(f"ADAM-STEP patched={patched} unpatched={unpatched}", flush=True)
    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
