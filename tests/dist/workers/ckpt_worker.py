"""Checkpoint save/load checks under torchrun (2 ranks, gloo), all in one launch.

Usage::

    torchrun --nproc_per_node=2 ckpt_worker.py --hf-dir HF --root DIR

1. TP=2: load HF weights, save steps 1..3 with extra and per-rank state, keep_last=2.
2. A save that fails before the rename (unpicklable extra state) raises on every rank,
   leaves ``latest`` at step 3 and removes its partial ``tmp-`` directory.
3. PP=2: load the latest checkpoint (saved at TP=2): logits equal the TP=2 model's and HF's;
   each rank gets its own rank state back.
4. Loading with another model's config fails naming the mismatching key.
5. With ``--tmpfs DIR`` (a small tmpfs): a save into a full file system raises the same error on
   every rank (none is left waiting), naming the path, the errno and the free space; ``latest``
   and the previous checkpoint survive (keep_last=1).  Then a truncated shard is named by
   ``load_checkpoint`` before the collective load starts (not an EOFError from torch's reader).
Prints ``CKPT-OK`` on rank 0 when everything passed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from ckpt_common import fixed_tokens, forward_logits, hf_logits

TOL = 1e-4


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf-dir", required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--tmpfs", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from transformers import AutoConfig

    from dapo_megatron.actor.hf_loading import load_hf_weights_into_model
    from dapo_megatron.actor.model import build_gpt_model
    from dapo_megatron.actor.parallel import destroy_parallel, init_parallel
    from dapo_megatron.checkpoint.layout import find_latest, step_dir_name
    from dapo_megatron.checkpoint.metadata import CheckpointMismatchError, read_checkpoint_metadata
    from dapo_megatron.checkpoint.training import load_checkpoint, load_rank_state, save_checkpoint

    cfg = AutoConfig.from_pretrained(args.hf_dir)
    root = Path(args.root)
    tokens = fixed_tokens(cfg.vocab_size)
    ref = hf_logits(args.hf_dir, tokens)

    # 1. TP=2 saves, keep_last
    init_parallel(2, 1, seed=0)
    model = build_gpt_model(cfg)
    load_hf_weights_into_model(model, args.hf_dir, cfg)
    logits_tp2 = forward_logits(model, tokens, cfg.hidden_size)
    assert (logits_tp2 - ref).abs().max().item() < TOL
    rng = torch.get_rng_state()
    for step in (1, 2, 3):
        out = save_checkpoint(
            root,
            step,
            model,
            cfg,
            extra_state={"step": step, "rng": rng},
            rank_state={"rank": dist.get_rank(), "step": step},
            keep_last=2,
        )
        assert out == root / step_dir_name(step), out
    dist.barrier()
    names = sorted(p.name for p in root.iterdir())
    assert names == ["latest", "step_00000002", "step_00000003"], names
    assert find_latest(root) == root / "step_00000003"
    meta = read_checkpoint_metadata(root)
    assert meta["saved_layout"] == {"tp": 2, "pp": 1} and meta["step"] == 3, meta
    dist.barrier()  # every rank has looked before rank 0 starts the next save

    # 2. a failing save never moves `latest`
    try:
        save_checkpoint(root, 4, model, cfg, extra_state={"fn": lambda: 0})
    except Exception as e:  # every rank must raise
        print(f"rank {dist.get_rank()} failed save raised {type(e).__name__}: {e}", flush=True)
    else:
        raise AssertionError("save with unpicklable extra_state did not raise")
    dist.barrier()
    assert not (root / "tmp-step_00000004").exists()
    assert find_latest(root) == root / "step_00000003"
    assert (root / "latest").read_text().strip() == "step_00000003"
    dist.barrier()
    save_checkpoint(
        root, 5, model, cfg, extra_state={"step": 5, "rng": rng}, rank_state={"rank": dist.get_rank()}, keep_last=2
    )
    dist.barrier()
    names = sorted(p.name for p in root.iterdir())
    assert names == ["latest", "step_00000003", "step_00000005"], names
    destroy_parallel(destroy_process_group=False)

    # 3. PP=2 loads the TP=2 checkpoint
    init_parallel(1, 2, seed=0)
    model_pp = build_gpt_model(cfg)
    extra = load_checkpoint(root, model_pp, cfg)
    assert extra["step"] == 5 and torch.equal(extra["rng"], rng), extra
    assert load_rank_state(root) == {"rank": dist.get_rank()}
    logits_pp2 = forward_logits(model_pp, tokens, cfg.hidden_size)
    if logits_pp2 is not None:
        d_tp = (logits_pp2 - logits_tp2).abs().max().item()
        d_hf = (logits_pp2 - ref).abs().max().item()
        print(f"CKPT tp2->pp2 max_abs_vs_tp2={d_tp:.3e} max_abs_vs_hf={d_hf:.3e}", flush=True)
        assert d_tp < TOL and d_hf < TOL, (d_tp, d_hf)

    # 4. another model's config is refused, naming the key
    other = AutoConfig.from_pretrained(args.hf_dir)
    other.num_hidden_layers = cfg.num_hidden_layers + 2
    try:
        load_checkpoint(root, model_pp, other)
    except CheckpointMismatchError as e:
        assert "num_layers" in str(e), e
    else:
        raise AssertionError("loading into another model did not fail")
    if args.tmpfs:
        full_disk(Path(args.tmpfs), model_pp, cfg)
    destroy_parallel(destroy_process_group=False)

    dist.barrier()
    if dist.get_rank() == 0:
        print("CKPT-OK", flush=True)
    destroy_parallel()
    return 0


def full_disk(tmpfs: Path, model, cfg) -> None:
    from dapo_megatron.checkpoint.agreement import CheckpointSaveError
    from dapo_megatron.checkpoint.training import load_checkpoint, save_checkpoint
    from dapo_megatron.checkpoint.verify import CheckpointIntegrityError, verify_checkpoint

    rank, root = dist.get_rank(), tmpfs / "ckpt"
    save_checkpoint(root, 1, model, cfg, extra_state={"step": 1}, keep_last=1)
    dist.barrier()
    if rank == 0:  # fill the file system: rank 0's first write (megatron's common.pt) fails
        with open(tmpfs / "filler", "wb") as f:
            os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(tmpfs).free)
    dist.barrier()
    try:
        save_checkpoint(root, 2, model, cfg, extra_state={"step": 2}, keep_last=1)
    except CheckpointSaveError as e:
        msg = str(e)
    else:
        raise AssertionError("a save into a full file system did not raise")
    print(f"rank {rank} FULL-DISK {msg}", flush=True)
    assert f"saving checkpoint step_00000002 into {root / 'tmp-step_00000002'} failed (rank 0: [Errno 28]" in msg, msg
    assert f"B free on the file system of {root} when it failed; `latest` still names step_00000001" in msg, msg
    dist.barrier()
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001"]
    assert verify_checkpoint(root, checksums=True).intact

    # a truncated shard is named before the collective load
    shard = max((root / "step_00000001").glob("*.distcp"), key=lambda p: p.stat().st_size)
    size = shard.stat().st_size
    dist.barrier()
    if rank == 0:
        (tmpfs / "filler").unlink()
        with open(shard, "r+b") as f:
            f.truncate(size // 2)
    dist.barrier()
    try:
        load_checkpoint(root, model, cfg)
    except CheckpointIntegrityError as e:
        expected = f"{shard.name}: expected {size} bytes, found {size // 2} bytes"
        assert f"checkpoint {root / 'step_00000001'} is damaged" in str(e) and expected in str(e), e
    else:
        raise AssertionError("a truncated shard was loaded")
    print(f"rank {rank} FULL-DISK-OK", flush=True)


if __name__ == "__main__":
    sys.exit(main())
