"""Load converted checkpoints into real TP/PP layouts, check logits against HF, save again.

Usage (under torchrun)::

    torchrun --nproc_per_node=N convert_worker.py --layouts 2x1,1x2 --out-root DIR HF_DIR:CKPT [...]

For every layout (TPxPP) and model: builds the model, loads the converted checkpoint
with :func:`dapo_megatron.checkpoint.training.load_checkpoint`, compares fp32 logits with
transformers' (prints ``PARITY``), and saves the model from that layout with
:func:`save_checkpoint` into ``DIR/<model>_<layout>`` for the export round trip.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from ckpt_common import fixed_tokens, forward_logits, hf_logits

TOL = 1e-4


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", required=True)
    ap.add_argument("--out-root", required=True)
    ap.add_argument("pairs", nargs="+")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from transformers import AutoConfig

    from dapo_megatron.actor.model import build_gpt_model
    from dapo_megatron.actor.parallel import destroy_parallel, init_parallel
    from dapo_megatron.checkpoint.training import load_checkpoint, save_checkpoint

    refs = {}
    for pair in args.pairs:
        hf_dir, _ = pair.split(":")
        cfg = AutoConfig.from_pretrained(hf_dir)
        tokens = fixed_tokens(cfg.vocab_size)
        refs[hf_dir] = (cfg, tokens, hf_logits(hf_dir, tokens))

    for spec in args.layouts.split(","):
        tp, pp = (int(x) for x in spec.split("x"))
        init_parallel(tp, pp, seed=0)
        for pair in args.pairs:
            hf_dir, ckpt = pair.split(":")
            cfg, tokens, ref = refs[hf_dir]
            model = build_gpt_model(cfg)
            assert load_checkpoint(ckpt, model, cfg) is None
            logits = forward_logits(model, tokens, cfg.hidden_size)
            if logits is not None and dist.get_rank() == dist.get_world_size() - 1:
                d = (logits - ref).abs().max().item()
                print(f"PARITY tp={tp} pp={pp} model={os.path.basename(hf_dir)} max_abs_logits={d:.3e}", flush=True)
                assert d < TOL, (spec, hf_dir, d)
            name = f"{os.path.basename(hf_dir)}_{spec}"
            save_checkpoint(os.path.join(args.out_root, name), 0, model, cfg)
        destroy_parallel(destroy_process_group=False)
    dist.barrier()
    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
