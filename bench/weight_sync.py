"""Weight sync time (actor -> colocated vLLM) vs a plain copy of the same bytes, per bucket size.

Run under torchrun (the actor and the engine share the ranks, as in training)::

    torchrun --nproc_per_node=2 bench/weight_sync.py [--actor 2x1] [--rollout-tp 1] \
        [--dtype bfloat16] [--buckets 16,64,256,1024] [--repeats 2] \
        [--hidden 1024 --layers 8 --ffn 2816 --vocab 32000]

The default model is a Qwen2 of ~155M parameters (620 MB fp32 actor; 310 MB per sync in bf16).
The actor is built from the config with random weights (no checkpoint needed); the engine
starts with dummy weights.  Measured on every rank, reported by rank 0 (min over repeats):

* ``gather``: walking the actor in HF order only (TP all-gather + cross-stage transfer + cast), no
  engine; with PP > 1 twice: every tensor whole to every rank (what crossed stages before), and only
  the slices each rank's engine keeps (what the sync does now), with the bytes that crossed stages;
* ``sync``: the full sync at each bucket size (gather + hand-over + vLLM's layerwise reload,
  which on CPU re-packs every Linear for oneDNN);
* ``copy``: ``Tensor.copy_`` of the same number of bytes into a preallocated buffer (memory
  bandwidth baseline, same run, same rank);
* ``verify``: one verification pass (reads every engine weight back; debug mode only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist


def min_time(fn, repeats: int, before=None) -> float:
    """Best of ``repeats`` timed calls of ``fn``, every rank in step; ``before`` runs untimed first."""
    best = float("inf")
    for _ in range(repeats):
        if before is not None:
            before()
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        best = min(best, time.perf_counter() - t0)
    return best


def add_model_shape_args(parser) -> None:
    """--hidden/--layers/--ffn/--vocab for :func:`qwen2_config`; the defaults give ~155M parameters."""
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)


def qwen2_config(hidden: int, layers: int, ffn: int, vocab: int):
    """A Qwen2 config of this size (64-wide heads, 4 query heads per KV head, untied); the
    defaults of the benches (1024, 8, 2816, 32000) give ~155M parameters."""
    import transformers

    heads = hidden // 64
    return transformers.Qwen2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
        intermediate_size=ffn,
        vocab_size=vocab,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        architectures=["Qwen2ForCausalLM"],
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--actor", default="2x1", help="actor TPxPP")
    ap.add_argument("--rollout-tp", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--buckets", default="16,64,256,1024", help="bucket sizes in MB")
    ap.add_argument("--repeats", type=int, default=2)
    add_model_shape_args(ap)
    ap.add_argument("--verify", action="store_true", help="also time one verification pass")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from dapo_megatron.actor.model import build_gpt_model
    from dapo_megatron.actor.parallel import init_parallel
    from dapo_megatron.rollout.vllm_engine import VllmEngine
    from dapo_megatron.weight_sync.gather import StageTraffic, iter_actor_hf_weights
    from dapo_megatron.weight_sync.sync import sync_weights, verify_weights
    from dapo_megatron.weight_sync.transport import ColocatedTransport

    tp, pp = (int(x) for x in args.actor.split("x"))
    init_parallel(tp, pp, seed=0)
    rank = dist.get_rank()
    hf_config = qwen2_config(args.hidden, args.layers, args.ffn, args.vocab)
    tmp = tempfile.mkdtemp(prefix="bench_ws_") if rank == 0 else None
    holder = [tmp]
    dist.broadcast_object_list(holder)
    model_dir = holder[0]
    if rank == 0:
        hf_config.save_pretrained(model_dir)  # config only: the engine starts with dummy weights
    dist.barrier()
    model = build_gpt_model(hf_config)
    n_params = sum(p.numel() for p in model.parameters())
    engine = VllmEngine(
        model_dir,
        tensor_parallel_size=args.rollout_tp,
        dtype=args.dtype,
        max_model_len=512,
        load_format="dummy",
        skip_tokenizer_init=True,
        max_num_seqs=8,
    )
    dtype = engine.dtype
    transport = ColocatedTransport(engine)

    total_bytes = sum(t.numel() * t.element_size() for _, t in iter_actor_hf_weights(model, hf_config, dtype=dtype))
    src = torch.randn(total_bytes // 4)
    dst = torch.empty_like(src)
    # warm-up: first-touch page faults of the engine's reload buffers and the gather's temporaries
    sync_weights(model, hf_config, transport, dtype=dtype, bucket_size_mb=256)
    results = {
        "actor": args.actor,
        "rollout_tp": args.rollout_tp,
        "dtype": args.dtype,
        "world": dist.get_world_size(),
        "actor_params_per_rank": n_params,
        "sync_bytes": total_bytes,
        "copy_s": min_time(lambda: dst.copy_(src), args.repeats + 2),
        "gather_s": min_time(
            lambda: sum(1 for _ in iter_actor_hf_weights(model, hf_config, dtype=dtype)), args.repeats
        ),
        "sync_s": {},
    }
    need = engine.weight_slices()
    results["gather_sliced_s"] = min_time(
        lambda: sum(1 for _ in iter_actor_hf_weights(model, hf_config, dtype=dtype, need=need)), args.repeats
    )
    # bytes that crossed pipeline stages, summed over ranks: whole tensors vs the engines' slices
    for key, want in (("stage_bytes_whole", None), ("stage_bytes_sliced", need)):
        traffic = StageTraffic()
        for _ in iter_actor_hf_weights(model, hf_config, dtype=dtype, need=want, traffic=traffic):
            pass
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, traffic.received_bytes)
        results[key] = per_rank
    for mb in (float(x) for x in args.buckets.split(",")):
        results["sync_s"][mb] = min_time(
            lambda mb=mb: sync_weights(model, hf_config, transport, dtype=dtype, bucket_size_mb=mb), args.repeats
        )
    if args.verify:
        results["verify_s"] = min_time(lambda: verify_weights(model, hf_config, engine, dtype=dtype), 1)
    if rank == 0:
        gb = total_bytes / 1e9
        print(f"model: {n_params / 1e6:.1f}M actor params on this rank; sync moves {gb * 1e3:.0f} MB ({args.dtype})")
        print(f"plain copy of the same bytes: {results['copy_s']:.3f} s ({gb / results['copy_s']:.2f} GB/s)")
        print(
            f"gather only (TP/PP collectives + cast): whole tensors {results['gather_s']:.3f} s, "
            f"engine slices {results['gather_sliced_s']:.3f} s"
        )
        whole, sliced = sum(results["stage_bytes_whole"]), sum(results["stage_bytes_sliced"])
        if whole:
            print(
                f"bytes across PP stages (all ranks): whole tensors {whole / 1e6:.1f} MB, engine slices "
                f"{sliced / 1e6:.1f} MB ({sliced / whole:.3f}x); per rank {results['stage_bytes_sliced']}"
            )
        print("| bucket MB | sync s | GB/s | x plain copy |")
        print("|---|---|---|---|")
        for mb, s in results["sync_s"].items():
            print(f"| {mb:g} | {s:.3f} | {gb / s:.2f} | {s / results['copy_s']:.1f} |")
        if "verify_s" in results:
            print(f"verification pass: {results['verify_s']:.3f} s")
        print("JSON " + json.dumps(results))
        import shutil

        shutil.rmtree(model_dir, ignore_errors=True)
    dist.barrier()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    sys.exit(main())
