"""What checking a checkpoint against its manifest costs, next to saving and loading it.

    torchrun --nproc_per_node=1 bench/checkpoint_verify.py [--hidden 1024 --layers 8 --ffn 2816 --vocab 32000]
        [--repeats 3] [--dir DIR]

Builds a Qwen2-shaped megatron model (default ~155M parameters, as bench/weight_sync.py) in
bf16 with megatron's distributed optimizer (fp32 main weights and two Adam moments: 14 bytes
per parameter, as a bf16 GPU run stores), takes one step so the optimizer state exists, and
saves it with the real ``save_checkpoint`` (which reads every file back for the manifest).
Then, min over ``--repeats``:

* ``save``: the whole save, manifest included; ``manifest``: building it alone (a CRC pass
  over the just-written files, which are in the page cache, as right after a save);
* ``verify sizes``: :func:`verify_checkpoint` without checksums (one ``stat`` per file);
* ``verify crc32 (cached)``: with checksums, files in the page cache;
* ``verify crc32 (cold)``: with checksums after ``posix_fadvise(DONTNEED)`` on every file, so
  the bytes come from the disk (only these files leave the cache, nothing else on the machine);
* ``load``: ``load_checkpoint`` of model + optimizer without verification, files cached;
* ``crc32 in memory``: ``zlib.crc32`` over a 256 MiB buffer (the CPU bound).

Prints one JSON object (rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
from weight_sync import add_model_shape_args, min_time, qwen2_config  # this script's directory is on sys.path


def _drop_from_page_cache(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    add_model_shape_args(ap)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir); removed at the end")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from dapo_megatron.actor.model import build_gpt_model
    from dapo_megatron.actor.parallel import init_parallel
    from dapo_megatron.checkpoint.layout import find_latest
    from dapo_megatron.checkpoint.manifest import build_manifest
    from dapo_megatron.checkpoint.training import load_checkpoint, save_checkpoint
    from dapo_megatron.checkpoint.verify import Verify, verify_checkpoint

    init_parallel(1, 1, seed=0)
    hf_config = qwen2_config(args.hidden, args.layers, args.ffn, args.vocab)
    model = build_gpt_model(hf_config, params_dtype=torch.bfloat16)
    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True),
        module=model,
    )
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-5, bf16=True, use_distributed_optimizer=True), [ddp]
    )
    tokens = torch.randint(0, args.vocab, (1, 16))
    s = tokens.shape[1]
    out = ddp(
        input_ids=tokens,
        position_ids=torch.arange(s).unsqueeze(0),
        attention_mask=torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1),
    )
    out.float().pow(2).mean().backward()
    ddp.finish_grad_sync()
    opt.step()
    n_params = sum(p.numel() for p in model.parameters())

    holder = [args.dir or (tempfile.mkdtemp(prefix="bench_ckpt_") if dist.get_rank() == 0 else None)]
    dist.broadcast_object_list(holder)  # one directory for every rank
    base = Path(holder[0])
    root = base / "ckpt"
    steps = iter(range(1, 1000))

    def save() -> None:
        save_checkpoint(root, next(steps), ddp, hf_config, optimizer=opt, keep_last=1)

    results = {"params": n_params, "world": dist.get_world_size(), "save_s": min_time(save, args.repeats)}
    directory = find_latest(root)
    files = [p for p in directory.rglob("*") if p.is_file()]
    results["checkpoint_bytes"] = sum(p.stat().st_size for p in files)
    results["files"] = len(files)
    results["manifest_s"] = min_time(lambda: build_manifest(directory), args.repeats)
    results["verify_sizes_s"] = min_time(lambda: verify_checkpoint(directory, checksums=False), args.repeats)
    results["verify_crc32_cached_s"] = min_time(lambda: verify_checkpoint(directory, checksums=True), args.repeats)
    results["verify_crc32_cold_s"] = min_time(
        lambda: verify_checkpoint(directory, checksums=True),
        args.repeats,
        before=lambda: _drop_from_page_cache(directory),
    )
    results["load_s"] = min_time(
        lambda: load_checkpoint(directory, ddp, hf_config, optimizer=opt, verify=Verify.DONE), args.repeats
    )
    buf = os.urandom(256 << 20)
    results["crc32_in_memory_gbps"] = (256 << 20) / min_time(lambda: zlib.crc32(buf), args.repeats) / 1e9
    gb = results["checkpoint_bytes"] / 1e9
    for key in ("manifest_s", "verify_crc32_cached_s", "verify_crc32_cold_s", "load_s"):
        results[key.replace("_s", "_gbps")] = gb / results[key]
    if dist.get_rank() == 0:
        print(json.dumps(results, indent=1))
    dist.barrier()
    if args.dir is None and dist.get_rank() == 0:
        shutil.rmtree(base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
