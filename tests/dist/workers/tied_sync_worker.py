"""Training keeps the engine on-policy, tied or untied, for every mapped family (one torchrun launch).

Usage::

    torchrun --nproc_per_node=2 tied_sync_worker.py --rollout-tp 1 --actor 2x1 --steps 5 HF_DIR [HF_DIR ...]

Per model (engines stay alive: vLLM's external launcher tears the world down when one is freed):

1. the engine starts from the HF checkpoint, as in training; the actor loads the same weights;
2. ``steps`` times: the engine samples (temperature 1), the actor scores the samples (the fresh
   rollout/actor gap must stay at the fp32 level, <= ``HEALTHY``), one real optimizer step with
   a large learning rate and random advantages moves the weights, and the sync pushes them with
   checksum verification and the function probe;
3. the weights really moved: the actor's log-probs of the first step's samples changed by far more
   than the healthy gap (otherwise the test could not see a stale layer);
4. tied models only, negative controls: a sync that leaves ``lm_head.weight`` out is refused by the
   engine, naming it; a sync that keeps ``lm_head.weight`` stale (the old bug's effect) fails
   checksum verification naming it, and the function probe sees a gap far above the healthy level.
   These also show the checks can fail: before the fix every tied model failed step 2's gap.

Rank 0 prints ``CHECK <model> <check> ...`` lines; any failure raises (non-zero exit).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist

HEALTHY = 1e-5  # fp32 engine vs fp32 actor, per token on average (measured ~1e-7..1e-6)
PROMPTS = 6
N = 2  # samples per prompt
MAX_TOKENS = 12


def say(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


class DropTensor:
    """A transport that never sends ``name``: the engine's completeness check must refuse it."""

    def __init__(self, inner, name: str):
        self.inner, self.name = inner, name

    def needed_slices(self):
        return self.inner.needed_slices()

    def begin(self):
        self.inner.begin()

    def send(self, bucket):
        self.inner.send([(n, t) for n, t in bucket if n != self.name])

    def finish(self):
        self.inner.finish()

    def abort(self, reason):
        self.inner.abort(reason)


class FailedLoads(logging.Handler):
    """Collects vLLM's "<Layer>: Failed to load weights" warnings: a layer that received
    nothing kept its old tensors."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.layers: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.endswith("Failed to load weights"):
            self.layers.append(message.split(":")[0])


def actor_config(tp: int, pp: int):
    from dapo_megatron.config import ActorConfig

    a = ActorConfig()
    a.parallel.tensor_model_parallel_size = tp
    a.parallel.pipeline_model_parallel_size = pp
    a.params_dtype = "float32"
    a.ppo_mini_batch_size = PROMPTS  # one optimizer step per update
    a.max_tokens_per_micro_batch = 512
    a.optim.lr = 1e-2  # large: the weights must move visibly in a few steps
    a.optim.lr_warmup_steps = 0
    a.optim.weight_decay = 0.0
    return a


def sample_batch(engine, prompts, seed: int, pad_id: int):
    from dapo_megatron.contract import ActorBatch
    from dapo_megatron.rollout.engine import SamplingSpec

    ro = engine.generate(prompts, N, SamplingSpec(temperature=1.0, max_tokens=MAX_TOKENS), seed)
    rows = [(list(prompts[ro.prompt_index[i]]), ro.response_ids[i]) for i in range(len(ro.response_ids))]
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), MAX_TOKENS), dtype=torch.bool)
    engine_lp = torch.zeros((len(rows), MAX_TOKENS))
    for i, (p, r) in enumerate(rows):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        mask[i, : len(r)] = True
        engine_lp[i, : len(r)] = torch.tensor(ro.logprobs[i])
    g = torch.Generator().manual_seed(seed)
    batch = ActorBatch(
        input_ids=ids,
        seq_lengths=torch.tensor([len(p) + len(r) for p, r in rows]),
        prompt_lengths=torch.tensor([len(p) for p, _ in rows]),
        response_mask=mask,
        advantages=torch.randn(len(rows), generator=g).sign(),
        group_size=N,
    )
    return batch, engine_lp


def run_model(hf_dir: str, args, tp: int, pp: int) -> dict:
    import dataclasses

    from transformers import AutoConfig

    from dapo_megatron.actor.actor import MegatronActor
    from dapo_megatron.actor.parallel import destroy_parallel, init_parallel
    from dapo_megatron.config import AlgorithmConfig
    from dapo_megatron.rollout.engine import SamplingSpec
    from dapo_megatron.rollout.mismatch import logprob_mismatch
    from dapo_megatron.rollout.vllm_engine import VllmEngine
    from dapo_megatron.weight_sync.probe import probe_policy
    from dapo_megatron.weight_sync.sync import WeightSyncError, sync_weights, verify_weights
    from dapo_megatron.weight_sync.transport import ColocatedTransport, StaleTensorDrill
    from dapo_megatron.weight_sync.verify import WeightMismatchError

    hf_config = AutoConfig.from_pretrained(hf_dir)
    label = Path(hf_dir).name
    tied = bool(hf_config.tie_word_embeddings)
    engine = VllmEngine(
        hf_dir,
        tensor_parallel_size=args.rollout_tp,
        dtype="float32",
        max_model_len=128,
        cpu_kv_cache_gb=0.125,
        skip_tokenizer_init=True,
        seed=0,
    )
    init_parallel(tp, pp, seed=1)
    result: dict = {"model": label, "tied": tied}
    try:
        actor = MegatronActor(
            actor_config(tp, pp), AlgorithmConfig(), hf_config, weights=hf_dir, temperature=1.0, total_training_steps=10
        )
        transport = ColocatedTransport(engine)
        f32 = torch.float32
        g = torch.Generator().manual_seed(3)
        prompts = [
            torch.randint(3, hf_config.vocab_size, (int(k),), generator=g).tolist() for k in range(4, 4 + PROMPTS)
        ]
        gaps, first = [], None
        failed_loads = FailedLoads()
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addHandler(failed_loads)
        for step in range(1, args.steps + 1):
            batch, engine_lp = sample_batch(engine, prompts, seed=step, pad_id=0)
            old, _ = actor.compute_log_probs(batch, compute_entropy=False)
            gap = logprob_mismatch(old, engine_lp, batch.response_mask)["mean_abs_diff"]
            gaps.append(gap)
            say(f"CHECK {label} step={step} fresh_mean_abs_diff={gap:.3e}")
            assert gap <= HEALTHY, f"{label} step {step}: fresh rollout/actor gap {gap:.3e} > {HEALTHY}"
            if first is None:
                first = (batch, old)
            actor.update(dataclasses.replace(batch, old_log_probs=old))
            sync_weights(actor.model, hf_config, transport, dtype=f32, bucket_size_mb=0.05)
            verified = verify_weights(actor.model, hf_config, engine, dtype=f32)
            probe = probe_policy(engine, actor, prompts, SamplingSpec(max_tokens=MAX_TOKENS), seed=99, pad_id=0)
            assert probe.mean_abs_diff <= HEALTHY, (label, step, probe)
            expected = len(engine.weight_slices())
            assert verified == expected, (label, verified, expected)
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").removeHandler(failed_loads)
        # every real parameter was loaded: only parameter-free layers (the rotary cache buffer) may be named
        assert set(failed_loads.layers) <= {"RotaryEmbedding"}, (label, failed_loads.layers)
        say(f"CHECK {label} failed_loads={sorted(set(failed_loads.layers))}")
        moved_lp, _ = actor.compute_log_probs(first[0], compute_entropy=False)
        moved = logprob_mismatch(moved_lp, first[1], first[0].response_mask)["mean_abs_diff"]
        say(f"CHECK {label} moved mean_abs_change={moved:.3e}")
        assert moved > 1000 * HEALTHY, f"{label}: the updates barely moved the policy ({moved:.3e})"
        result.update(gaps=gaps, moved=moved)

        if tied:
            try:
                sync_weights(
                    actor.model, hf_config, DropTensor(transport, "lm_head.weight"), dtype=f32, bucket_size_mb=0.05
                )
            except WeightSyncError as e:
                assert "lm_head.weight" in str(e), str(e)
                say(f"CHECK {label} missing_tied_head_refused")
            else:
                raise AssertionError(f"{label}: a sync without lm_head.weight was accepted")
            drill = StaleTensorDrill(transport, ["lm_head.weight"])
            sync_weights(actor.model, hf_config, drill, dtype=f32, bucket_size_mb=0.05)  # first value: current
            batch, engine_lp = sample_batch(engine, prompts, seed=50, pad_id=0)
            old, _ = actor.compute_log_probs(batch, compute_entropy=False)
            actor.update(dataclasses.replace(batch, old_log_probs=old))
            sync_weights(actor.model, hf_config, drill, dtype=f32, bucket_size_mb=0.05)  # head stays stale
            probe = probe_policy(engine, actor, prompts, SamplingSpec(max_tokens=MAX_TOKENS), seed=99, pad_id=0)
            say(f"CHECK {label} stale_head_probe mean_abs_diff={probe.mean_abs_diff:.3e}")
            assert probe.mean_abs_diff > 100 * HEALTHY, (label, probe)
            try:
                verify_weights(actor.model, hf_config, engine, dtype=f32)
            except WeightMismatchError as e:
                # the head's stale values land in the storage it shares with the embedding, so
                # the embedding is named as well: the engine computes with neither
                assert "lm_head.weight" in str(e), str(e)
                say(f"CHECK {label} stale_head_named")
            else:
                raise AssertionError(f"{label}: verification passed with a stale LM head")
            result["stale_probe"] = probe.mean_abs_diff
    finally:
        destroy_parallel(destroy_process_group=False)
    # the engine stays referenced by the caller: freeing it would tear down the process group
    result["_engine"] = engine
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rollout-tp", type=int, required=True)
    parser.add_argument("--actor", required=True, help="TPxPP of the actor, e.g. 2x1")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", required=True)
    parser.add_argument("hf_dirs", nargs="+")
    args = parser.parse_args()
    torch.manual_seed(0)
    dist.init_process_group("gloo")
    tp, pp = (int(x) for x in args.actor.split("x"))
    results = [run_model(d, args, tp, pp) for d in args.hf_dirs]
    if dist.get_rank() == 0:
        public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
        Path(args.out).write_text(json.dumps(public, indent=1))
        print("CHECK all_done", flush=True)
    dist.barrier()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
