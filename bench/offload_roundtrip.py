"""Actor offload/onload round trip vs a plain copy of the same bytes, per kind.

    torchrun --nproc_per_node=1 bench/offload_roundtrip.py [--hidden 1024 --layers 8 --ffn 2816 --vocab 32000]
    torchrun --nproc_per_node=1 bench/offload_roundtrip.py --tiny

The default model is the ~155M-parameter Qwen2 of bench/weight_sync.py (fp32 on CPU, bf16 on
CUDA); ``--tiny`` is the demo's model shape.  The actor (DDP + distributed optimizer) takes one
real optimizer step first so that Adam's moments exist.  Then, min over ``--repeats``:

* ``offload`` / ``onload``: :class:`dapo_megatron.actor.offload.ActorOffloader` per kind and for
  all three together (grads are dropped on offload and zeroed on onload, not copied);
* ``copy``: ``Tensor.copy_`` of the same bytes device -> host buffer and back, both buffers
  allocated and touched beforehand (the bandwidth bound: a round trip moves its bytes twice
  and also allocates, which the bound does not);
* ``released``: with CUDA, ``torch.cuda.memory_allocated`` before minus after the offload (must
  equal the bytes moved); on CPU the process's anonymous resident memory before minus after,
  plus what the offloader's host pool grew by (on CPU it sits in the same memory; it is
  allocated on the first offload of a kind and reused after).  glibc returns large blocks to
  the kernel at once, so for the ~155M model this is the storage really released; the tiny
  model's buffers are below glibc's mmap threshold and stay in its heap.

Prints one JSON line per kind.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.distributed as dist
from weight_sync import add_model_shape_args, qwen2_config  # this script's directory is on sys.path


def anon_bytes() -> int:
    """Private resident memory (RSS minus file-backed pages)."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["RssAnon"].split()[0]) * 1024


def host_pool_bytes(actor) -> int:
    return sum(h.numel() for hosts in actor.offloader._host.values() for h in hosts)


def allocated() -> int:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    return anon_bytes()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    add_model_shape_args(ap)
    ap.add_argument("--tiny", action="store_true", help="the demo's tiny model shape")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    if args.tiny:
        args.hidden, args.layers, args.ffn, args.vocab = 64, 2, 128, 512
    torch.set_num_threads(1)

    from dapo_megatron.actor.actor import MegatronActor
    from dapo_megatron.actor.parallel import init_parallel
    from dapo_megatron.config import OFFLOAD_KINDS, ActorConfig, AlgorithmConfig
    from dapo_megatron.contract import ActorBatch

    init_parallel(1, 1, seed=0)
    hf_config = qwen2_config(args.hidden, args.layers, args.ffn, args.vocab)
    cfg = ActorConfig()
    cfg.params_dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    cfg.ppo_mini_batch_size = 1
    cfg.max_tokens_per_micro_batch = 256
    actor = MegatronActor(cfg, AlgorithmConfig(), hf_config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (2, 64), generator=g)
    mask = torch.ones(2, 32, dtype=torch.bool)
    lengths, prompts = torch.tensor([64, 64]), torch.tensor([32, 32])
    batch = ActorBatch(ids, lengths, prompts, mask, -torch.rand(2, 32), torch.randn(2), group_size=2)
    actor.update(batch)  # Adam's moments exist from here on

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for kinds in [(k,) for k in OFFLOAD_KINDS] + [tuple(OFFLOAD_KINDS)]:
        best = {"offload": float("inf"), "onload": float("inf"), "copy": float("inf")}
        moved = released = 0
        for _ in range(args.repeats):
            pool_before = host_pool_bytes(actor)
            before = allocated()
            t0 = time.perf_counter()
            stats = actor.offload(kinds)
            best["offload"] = min(best["offload"], time.perf_counter() - t0)
            # On CPU the host copies live in the same memory as the freed storage: count back
            # what the offloader's (reused) host pool grew by during this offload.
            grown = 0 if torch.cuda.is_available() else host_pool_bytes(actor) - pool_before
            released = before - allocated() + grown
            t0 = time.perf_counter()
            actor.onload(kinds)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            best["onload"] = min(best["onload"], time.perf_counter() - t0)
            moved = stats.total_bytes
            # warm (touched) buffers: the bound is the copy bandwidth, not first-touch page faults
            src = torch.ones(moved, dtype=torch.uint8, device=device)
            host = torch.ones(moved, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
            t0 = time.perf_counter()
            host.copy_(src)
            src.copy_(host)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            best["copy"] = min(best["copy"], time.perf_counter() - t0)
            del src, host
        round_trip = best["offload"] + best["onload"]
        rows.append(
            {
                "kinds": "+".join(kinds),
                "params": sum(p.numel() for p in actor.gpt.parameters()),
                "bytes_moved": moved,
                "released_bytes": released,
                "offload_s": round(best["offload"], 4),
                "onload_s": round(best["onload"], 4),
                "copy_there_and_back_s": round(best["copy"], 4),
                "round_trip_over_copy": round(round_trip / max(best["copy"], 1e-9), 2),
                "device": device,
            }
        )
    if dist.get_rank() == 0:
        for r in rows:
            print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
