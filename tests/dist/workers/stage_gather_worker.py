"""Cross-stage weight walk with per-rank needs (weight_sync/gather.py), no engine, under torchrun.

Usage::

    torchrun --nproc_per_node=4 stage_gather_worker.py --layouts 1x2,2x2,1x4 HF_DIR [HF_DIR ...]

Per actor layout (TPxPP) and model, every rank:

1. walks the actor with ``need=None`` (every tensor whole: the old behaviour, and the reference);
2. walks it again (bf16) with a need of its own -- the slices an engine of TP = ``k`` would keep on
   this rank, rows split unevenly like a vocab shard, o_proj/down_proj split on columns (the
   non-contiguous path), norms whole; half of the ranks pass ``None`` in a second variant;
3. checks own-stage tensors are whole and equal the reference, other stages' tensors equal the
   reference on the needed slice and are NaN elsewhere, and that the bytes received equal the
   needed slices' bytes (counted from the checkpoint's shapes, not from the gather's plan) --
   the test that fails when a stage sends more than the receiver needs;
4. a slice outside a tensor, asked for by one rank, fails every rank of its TP x PP grid before
   any data moves (naming the tensor), and the next walk works.
Rank 0 prints ``CHECK ...`` lines; any failure raises.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.distributed as dist


def hf_shapes(hf_dir: str) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(os.path.join(hf_dir, "model.safetensors"), framework="pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def engine_like_need(shapes: dict[str, tuple[int, ...]], k: int, j: int) -> dict:
    """Slices an engine TP rank ``j`` of ``k`` would keep (uneven last chunk, as vLLM's vocab shards)."""
    from dapo_megatron.weight_sync.slices import WHOLE, TensorSlice

    need = {}
    for name, shape in shapes.items():
        if "norm" in name:
            need[name] = WHOLE
            continue
        dim = 1 if name.endswith(("o_proj.weight", "down_proj.weight")) else 0
        chunk = math.ceil(shape[dim] / k)
        start = min(j * chunk, shape[dim])
        need[name] = TensorSlice(dim, start, min(chunk, shape[dim] - start))
    return need


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def check_model(hf_dir: str, tp: int, pp: int) -> list[str]:
    from megatron.core import parallel_state as ps
    from transformers import AutoConfig

    from dapo_megatron.actor.hf_loading import load_hf_weights_into_model
    from dapo_megatron.actor.model import build_gpt_model
    from dapo_megatron.weight_sync.gather import StageTraffic, iter_actor_hf_weights, stage_plan
    from dapo_megatron.weight_sync.slices import TensorSlice

    rank, world = dist.get_rank(), dist.get_world_size()
    hf_config = AutoConfig.from_pretrained(hf_dir)
    model = build_gpt_model(hf_config)
    load_hf_weights_into_model(model, hf_dir, hf_config)
    shapes = hf_shapes(hf_dir)
    own = {name for name, _ in stage_plan(model, hf_config, tp)}
    others = {n: s for n, s in shapes.items() if n not in own}
    bf16 = torch.bfloat16
    label = f"tp={tp} pp={pp} model={os.path.basename(hf_dir)}"

    # 1. whole tensors: the reference, and the bytes every rank received before slicing
    whole = StageTraffic()
    ref = {n: t.clone() for n, t in iter_actor_hf_weights(model, hf_config, dtype=bf16, traffic=whole)}
    assert set(ref) == set(shapes), sorted(set(ref) ^ set(shapes))
    full_bytes = sum(nbytes(s, bf16) for s in others.values())
    assert whole.received_bytes == full_bytes, (rank, whole.received_bytes, full_bytes)

    lines = []
    k = max(2, pp)  # engine TP; with PP=4 every receiver of a pipeline group needs a different slice
    for variant in ("all", "mixed"):
        need = engine_like_need(shapes, k, rank % k)
        if variant == "mixed" and rank % 2 == 0:
            need = None
        traffic = StageTraffic()
        seen = 0
        for name, t in iter_actor_hf_weights(model, hf_config, dtype=bf16, need=need, traffic=traffic):
            seen += 1
            want = ref[name]
            assert t.dtype == bf16 and t.shape == want.shape, (name, t.dtype, t.shape)
            part = TensorSlice() if need is None or name in own else need[name]
            if part.covers(tuple(want.shape)):
                assert torch.equal(t, want), name
                continue
            assert torch.equal(part.of(t), part.of(want)), name
            outside = t.numel() - part.of(t).numel()
            assert int(torch.isnan(t).sum()) == outside, (name, "not NaN outside the received slice")
        assert seen == len(shapes)
        if need is None:
            expected = full_bytes
        else:
            expected = sum(
                nbytes(s, bf16) if need[n].covers(s) else nbytes(need[n].shape_in(s), bf16) for n, s in others.items()
            )
        assert traffic.received_bytes == expected, (rank, variant, traffic.received_bytes, expected)
        totals = torch.tensor([traffic.sent_bytes, traffic.received_bytes, full_bytes], dtype=torch.float64)
        dist.all_reduce(totals)
        assert totals[0] == totals[1], (variant, totals.tolist())
        if variant == "all":
            assert traffic.received_bytes < 0.7 * full_bytes, (rank, traffic.received_bytes, full_bytes)
        lines.append(
            f"CHECK {label} variant={variant} engine_tp={k} cross_stage_bytes={int(totals[1])} "
            f"whole_tensors={int(totals[2])} ratio={float(totals[1] / totals[2]):.3f}"
        )

    # 4. a slice past the end, asked for by the last rank only: every rank fails, naming it
    victim = next(n for n in shapes if n not in own) if rank == world - 1 else None
    holder = [victim]
    dist.broadcast_object_list(holder, src=world - 1)
    victim = holder[0]
    bad = engine_like_need(shapes, k, rank % k)
    if rank == world - 1:
        bad[victim] = TensorSlice(0, 1, shapes[victim][0])
    # the ranks walking together (one TP x PP grid) all fail; another data-parallel grid is unaffected
    grid = dist.get_process_group_ranks(ps.get_model_parallel_group())
    try:
        for _ in iter_actor_hf_weights(model, hf_config, dtype=bf16, need=bad):
            pass
    except ValueError as e:
        assert world - 1 in grid, f"rank {rank} failed for another grid's slice: {e}"
        assert victim in str(e) and "outside" in str(e), str(e)
    else:
        if world - 1 in grid:
            raise AssertionError(f"rank {rank}: a slice outside {victim!r} was accepted")
    again = sum(1 for _ in iter_actor_hf_weights(model, hf_config, dtype=bf16, need=None))
    assert again == len(shapes)
    lines.append(f"CHECK {label} bad_slice_fails_everywhere")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", default="1x2,2x2,1x4", help="comma-separated actor TPxPP layouts")
    ap.add_argument("hf_dirs", nargs="+")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from dapo_megatron.actor.parallel import destroy_parallel, init_parallel

    for spec in args.layouts.split(","):
        tp, pp = (int(x) for x in spec.split("x"))
        init_parallel(tp, pp, seed=1)
        for hf_dir in args.hf_dirs:
            lines = check_model(hf_dir, tp, pp)
            if dist.get_rank() == 0:
                print("\n".join(lines), flush=True)
        destroy_parallel(destroy_process_group=False)
    dist.barrier()
    destroy_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
