"""The DAPO loop: one call per stage, in the order data flows through a step.

SPMD: every torchrun rank runs this same loop. Every rank draws the same prompts,
the engine returns the whole round to every rank, scoring is sliced across ranks
and gathered, so the dynamic-sampling buffer makes the same decision everywhere;
then each data-parallel rank trains on its share of every mini-batch. Rank 0
logs and writes the trainer state next to the distributed checkpoint.

Steps are training steps (not generation rounds), so the LR schedule, test_freq
and save_freq mean what they say however many rounds dynamic sampling needs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dapo_megatron import experience, verl_metrics
from dapo_megatron.algo.dynamic_sampling import DynamicSamplingBuffer, Group
from dapo_megatron.config import DapoConfig, data_parallel_size, to_dict, validate
from dapo_megatron.distributed import all_max, all_sum, any_true
from dapo_megatron.lifecycle import ColocatedLifecycle, LifecyclePlan, Phase

logger = logging.getLogger(__name__)

TRAINER_STATE_VERSION = 1


class StopRequested(Exception):
    """Raised out of the loop after a pre-emption signal was honoured (checkpoint written)."""


class DapoTrainer:
    def __init__(self, cfg: DapoConfig) -> None:
        self.cfg = cfg
        self.timings: dict[str, float] = defaultdict(float)
        self._stop_signal: int | None = None

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        from transformers import AutoConfig, AutoTokenizer

        from dapo_megatron.actor.parallel import init_parallel
        from dapo_megatron.data.parquet_dataset import load_prompt_dataset
        from dapo_megatron.data.sampler import ResumableSampler
        from dapo_megatron.reward.custom import load_file_scorer
        from dapo_megatron.reward.pool import RewardPool
        from dapo_megatron.rollout.mismatch import max_mismatch_for
        from dapo_megatron.weight_sync.transport import ColocatedTransport, StaleTensorDrill

        cfg = self.cfg
        world = int(os.environ.get("WORLD_SIZE", "1"))
        validate(cfg, world_size=world, check_files=True)
        if torch.cuda.is_available():
            self._preflight()
        # Data first: a bad file should fail in seconds, before any process group or model exists.
        model_path = cfg.actor.model_path
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.data.tokenizer_path or model_path)
        self.hf_config = AutoConfig.from_pretrained(model_path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        load = dict(
            max_prompt_length=cfg.data.max_prompt_length,
            prompt_key=cfg.data.prompt_key,
            dedup=cfg.data.dedup_prompts,
            filter_overlong_prompts=cfg.data.filter_overlong_prompts,
            truncation=cfg.data.truncation,
            apply_chat_template=cfg.data.apply_chat_template,
        )
        self.train_set = load_prompt_dataset(cfg.data.train_files, self.tokenizer, **load)
        self.val_set = []
        if cfg.data.val_files:
            val = load_prompt_dataset(cfg.data.val_files, self.tokenizer, **load)
            limit = cfg.data.val_max_samples
            self.val_set = list(val) if limit < 0 else list(val)[:limit]
        custom = cfg.reward.custom_function
        # Imported now: a wrong path or name fails before any process group or model exists.
        scorer = load_file_scorer(custom.path, custom.name) if custom.path else None
        par = cfg.actor.parallel
        init_parallel(par.tensor_model_parallel_size, par.pipeline_model_parallel_size, seed=cfg.actor.seed)
        from megatron.core import parallel_state as ps

        self.rank = dist.get_rank()
        self._check_resume_target()
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_size = data_parallel_size(cfg, world)
        self.is_logger = self.rank == 0
        self.total_steps = self._total_steps()
        self.actor = self._build_actor()
        self.lifecycle = self._build_lifecycle()
        self.pool = RewardPool.from_config(cfg.reward, scorer=scorer)
        self.sampler = ResumableSampler(len(self.train_set), seed=cfg.data.seed, shuffle=cfg.data.shuffle)
        fg = cfg.algorithm.filter_groups
        self.buffer = DynamicSamplingBuffer(
            cfg.data.train_batch_size,
            enable=fg.enable,
            metric=fg.metric,
            std_tolerance=fg.std_tolerance,
            max_num_gen_batches=fg.max_num_gen_batches,
            on_exhausted=fg.on_exhausted,
            max_carry_age=fg.max_carry_age,
            payload_type=experience.GroupSamples,
        )
        self.step = 0
        resumed = self._maybe_resume()
        # The actor hands back what it does not hold while the engine generates before the
        # engine is built: vLLM's start-up check wants gpu_memory_utilization x HBM free.
        self._enter(Phase.ROLLOUT)
        self.engine = self._build_engine()
        self.lifecycle.attach_engine(self.engine)
        self.transport = ColocatedTransport(self.engine)
        if cfg.rollout.weight_sync.inject_stale_tensors:
            self.transport = StaleTensorDrill(self.transport, cfg.rollout.weight_sync.inject_stale_tensors)
        self.max_mismatch = max_mismatch_for(cfg.rollout.max_mismatch, cfg.rollout.dtype, cfg.actor.params_dtype)
        self._mismatch_breaches = 0
        # the function check's prompts: fixed, so probe gaps are comparable across steps
        probe_count = min(cfg.rollout.weight_sync.probe_prompts, len(self.train_set))
        self.probe_prompts = [self.train_set[i].prompt_ids for i in range(probe_count)]
        if self._engine_needs_actor_weights(resumed):
            self._refresh_engine()
            logger.info("engine weights synced from the actor (%s)", "resumed" if resumed else "dummy start")
        self.timings.clear()
        self.tracker = None
        if self.is_logger:
            from dapo_megatron.tracking import MetricsLogger

            self.tracker = MetricsLogger(
                cfg.trainer.output_dir,
                cfg.trainer.logger,
                project=cfg.trainer.project_name,
                experiment=cfg.trainer.experiment_name,
                config=to_dict(cfg),
                resume_step=self.step if resumed else None,
            )
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)

    def _engine_needs_actor_weights(self, resumed: bool) -> bool:
        """Before any validation or generation: a dummy-started engine holds random weights, and
        after a resume the engine holds the HF checkpoint's, not the resumed actor's."""
        return resumed or self.engine.load_format == "dummy"

    def _build_actor(self):
        from dapo_megatron.actor.actor import MegatronActor

        cfg = self.cfg
        return MegatronActor(
            cfg.actor,
            cfg.algorithm,
            self.hf_config,
            weights=cfg.actor.model_path,
            temperature=cfg.rollout.temperature,
            total_training_steps=self.total_steps,
            pad_token_id=self.pad_id,
        )

    def _build_lifecycle(self) -> ColocatedLifecycle:
        return ColocatedLifecycle(LifecyclePlan.from_config(self.cfg), self.actor)

    def _build_engine(self):
        from dapo_megatron.rollout.vllm_engine import VllmEngine

        cfg = self.cfg
        return VllmEngine.from_config(
            cfg.rollout,
            cfg.actor.model_path,
            max_model_len=cfg.data.max_prompt_length + cfg.data.max_response_length,
        )

    def _preflight(self) -> None:
        """Refuse a config whose memory estimate does not fit this GPU, before loading anything.

        CPU runs skip it: the planner models GPU memory (weights, optimizer, KV cache).
        """
        from dapo_megatron.plan import Assumptions, Cluster, format_plan, make_plan, suggest
        from dapo_megatron.plan_memory import load_model_shape

        t = self.cfg.trainer
        gib = torch.cuda.get_device_properties(0).total_memory / 2**30
        cluster = Cluster(nodes=t.nnodes, gpus_per_node=t.n_gpus_per_node, gpu_memory_gib=gib)
        shape = load_model_shape(os.path.join(self.cfg.actor.model_path, "config.json"))
        plan = make_plan(self.cfg, shape, cluster, Assumptions())
        if int(os.environ.get("RANK", "0")) == 0:
            # the table this check judged, phase by phase, as the trainer's lifecycle will run them
            logger.info("preflight:\n%s", format_plan(plan, Assumptions()))
        for warning in plan.warnings:
            logger.warning("preflight: %s", warning)
        if not plan.feasible:
            hints = suggest(self.cfg, shape, cluster, Assumptions())
            raise RuntimeError(
                "preflight plan refuses this run on "
                f"{t.nnodes} x {t.n_gpus_per_node} x {gib:.0f} GiB:\n  - "
                + "\n  - ".join(plan.problems)
                + ("\ntry: " + " | ".join(hints) if hints else "")
            )

    @property
    def ckpt_root(self) -> Path:
        return Path(self.cfg.trainer.output_dir) / "checkpoints"

    def _check_resume_target(self) -> None:
        """Choose the checkpoint to resume from and verify its files against its manifest
        (``resume=auto`` falls back past damaged ones), then refuse a checkpoint of another
        model or one whose optimizer state cannot load at this layout (only legacy
        ``dp_reshardable`` state is layout-bound), and list the settings changed since it was
        saved: all before the model, the engine or any collective load exists."""
        from dapo_megatron.actor.checkpoint import check_compatible, check_optimizer_layout, read_checkpoint_metadata
        from dapo_megatron.resume import choose_checkpoint, log_config_diff

        saving = self.cfg.trainer.checkpoint
        self._resume_dir = choose_checkpoint(saving.resume, self.ckpt_root, checksums=saving.verify_checksums).directory
        if self._resume_dir is not None:
            meta = read_checkpoint_metadata(self._resume_dir)
            where = f"checkpoint {self._resume_dir}"
            check_compatible(meta, self.hf_config, where=where)
            par = self.cfg.actor.parallel
            check_optimizer_layout(meta, par.tensor_model_parallel_size, par.pipeline_model_parallel_size, where=where)
            if self.rank == 0:
                log_config_diff(meta.get("run_config"), to_dict(self.cfg), self._resume_dir)

    def _total_steps(self) -> int:
        t = self.cfg.trainer
        if t.total_training_steps is not None:
            return t.total_training_steps
        # At least one generation round per step: an epoch is at most this many steps.
        return t.total_epochs * math.ceil(len(self.train_set) / self.cfg.data.gen_batch_size)

    def _on_signal(self, signum, frame) -> None:
        logger.warning("received signal %d: checkpointing after the current step, then exiting", signum)
        self._stop_signal = signum

    # ------------------------------------------------------------------ resume
    def _trainer_state(self) -> dict:
        return {
            "version": TRAINER_STATE_VERSION,
            "step": self.step,
            "sampler": self.sampler.state_dict(),
            "buffer": self.buffer.state_dict(),
            "actor_update_count": self.actor.update_count,
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
            },
        }

    def _maybe_resume(self) -> bool:
        from dapo_megatron.actor.checkpoint import Verify, load_checkpoint

        path = self._resume_dir
        if path is None:
            return False
        state = load_checkpoint(
            path, self.actor.model, self.hf_config, optimizer=self.actor.optimizer, verify=Verify.DONE
        )
        if not state or state.get("version") != TRAINER_STATE_VERSION:
            raise ValueError(f"checkpoint {path} has no trainer state of version {TRAINER_STATE_VERSION}")
        self.step = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        self.buffer.load_state_dict(state["buffer"])
        self.actor.update_count = int(state["actor_update_count"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
        logger.info("resumed from %s at step %d", path, self.step)
        return True

    def save_checkpoint(self, *, commit: bool = True):
        """Write the checkpoint of this step; ``commit=False`` leaves ``latest`` for
        :meth:`commit_checkpoint` (returns the pending checkpoint)."""
        from dapo_megatron.actor.checkpoint import save_checkpoint

        self.actor.require_resident(("params", "optimizer"), "save a checkpoint")
        with self._timer("save_checkpoint"):
            return save_checkpoint(
                self.ckpt_root,
                self.step,
                self.actor.model,
                self.hf_config,
                optimizer=self.actor.optimizer,
                extra_state=self._trainer_state(),
                keep_last=self.cfg.trainer.checkpoint.keep_last,
                commit=commit,
                run_config=to_dict(self.cfg),
            )

    def commit_checkpoint(self, pending) -> Path:
        from dapo_megatron.actor.checkpoint import commit_checkpoint

        with self._timer("save_checkpoint"):
            return commit_checkpoint(pending)

    # ------------------------------------------------------------------ stages
    @contextmanager
    def _timer(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] += time.perf_counter() - t0

    def _generation_seed(self, round_index: int) -> int:
        return self.cfg.rollout.seed * 1_000_003 + self.step * 1_009 + round_index

    def _generate_round(self, round_index: int) -> experience.RoundResult:
        from dapo_megatron.reward.sharded import score_sharded
        from dapo_megatron.rollout.sampling import train_sampling

        cfg = self.cfg
        records = [self.train_set[i] for i in self.sampler.next_batch(cfg.data.gen_batch_size)]
        spec = train_sampling(cfg.rollout, cfg.data.max_response_length)
        with self._timer("gen"):
            rollouts = self.engine.generate(
                [r.prompt_ids for r in records], cfg.rollout.n, spec, self._generation_seed(round_index)
            )
        with self._timer("reward"):
            texts = self.tokenizer.batch_decode(rollouts.response_ids, skip_special_tokens=True)
            truths = [r.ground_truth for r in records for _ in range(cfg.rollout.n)]
            contexts = [(r.data_source, r.extra_info) for r in records for _ in range(cfg.rollout.n)]
            scored = score_sharded(self.pool, texts, truths, contexts)
        return experience.build_round(cfg, records, rollouts, scored, draw=f"{self.step}.{round_index}")

    def _collect_batch(self) -> tuple[list[Group], list[experience.RoundResult]]:
        self.buffer.begin_step(self.step)
        rounds = []
        while self.buffer.should_generate():
            result = self._generate_round(len(rounds))
            self.buffer.add_round(result.groups)
            rounds.append(result)
        groups = self.buffer.take()
        mini = self.cfg.actor.ppo_mini_batch_size
        if len(groups) % mini:
            # A partial batch (on_exhausted=train_partial) trains on whole mini-batches only.
            usable = len(groups) - len(groups) % mini
            if usable == 0:
                raise RuntimeError(
                    f"dynamic sampling kept {len(groups)} groups at step {self.step}, fewer than one mini-batch "
                    f"(actor.ppo_mini_batch_size={mini}); raise algorithm.filter_groups.max_num_gen_batches"
                )
            logger.warning(
                "step %d: training on %d of %d kept groups (whole mini-batches)", self.step, usable, len(groups)
            )
            groups = groups[:usable]
        return groups, rounds

    def _train_on(self, groups: list[Group]) -> dict[str, float]:
        from dapo_megatron.algo.rollout_correction import rollout_corr_metrics_over_ranks, truncated_is_weights
        from dapo_megatron.rollout.mismatch import logprob_mismatch

        cfg = self.cfg
        mine = experience.dp_shard(
            groups, mini_batch_groups=cfg.actor.ppo_mini_batch_size, dp_size=self.dp_size, dp_rank=self.dp_rank
        )
        with self._timer("adv"):
            adv = experience.advantages_for(mine, norm_by_std=cfg.algorithm.norm_adv_by_std)
            batch = experience.to_actor_batch(
                mine,
                max_response_length=cfg.data.max_response_length,
                pad_token_id=self.pad_id,
                mask_truncated=cfg.algorithm.mask_truncated_responses,
                advantages=adv,
            )
        with self._timer("old_log_prob"):
            old, _ = self.actor.compute_log_probs(batch, compute_entropy=False)
        metrics: dict[str, float] = {}
        mask = batch.response_mask.bool()
        self._require_finite_policy(old, mask)
        rollout_lp = experience.rollout_log_probs(mine, cfg.data.max_response_length)
        # Groups carried over from an earlier step were sampled by earlier weights: their gap
        # is off-policy staleness, not a sync error, so it gets its own metric.
        born = torch.tensor([g.born_step for g in mine for _ in g.payload.response_ids])
        fresh = mask & (born == self.step).unsqueeze(-1)
        for prefix, part in (("rollout/actor_mismatch_", fresh), ("rollout/carried_mismatch_", mask & ~fresh)):
            if bool(part.any()):
                mm = logprob_mismatch(old, rollout_lp, part)
                metrics.update({prefix + k: v for k, v in mm.items() if k != "tokens"})
        metrics.update(self._guard_mismatch(metrics.get("rollout/actor_mismatch_mean_abs_diff", 0.0)))
        if cfg.algorithm.rollout_is.enable:
            # Token-level advantages A * w are exactly the TIS-weighted loss (see rollout_correction).
            cap = cfg.algorithm.rollout_is.cap
            weights = truncated_is_weights(old, rollout_lp, mask, cap=cap)
            metrics.update(rollout_corr_metrics_over_ranks(old, rollout_lp, mask, cap=cap))  # collective
            batch = dataclasses.replace(batch, advantages=adv.unsqueeze(-1) * weights)
        batch = dataclasses.replace(batch, old_log_probs=old)
        t0 = time.perf_counter()
        with self._timer("update_actor"):
            metrics.update(self.actor.update(batch))
        if torch.cuda.is_available():  # a CPU has no meaningful peak to compare with
            metrics["perf/mfu/actor"] = self._actor_mfu(batch.seq_lengths.tolist(), time.perf_counter() - t0)
        return metrics

    def _require_finite_policy(self, old_log_probs: torch.Tensor, mask: torch.Tensor) -> None:
        """Stop when the weights themselves have overflowed, without checkpointing them.

        A NaN loss with healthy weights is skipped by the actor; non-finite log-probs of the
        responses the engine just sampled mean the last update already broke the weights, so
        every further step would be skipped too, and saving them would point ``latest`` at a
        policy nobody can resume from.
        """
        from dapo_megatron.actor.actor import NonFinitePolicyError
        from dapo_megatron.actor.checkpoint import find_latest

        bad = int((~torch.isfinite(old_log_probs) & mask).sum())
        if any_true(bad > 0):
            latest = find_latest(self.ckpt_root)
            raise NonFinitePolicyError(
                f"step {self.step}: the actor's log-probs of the sampled responses are non-finite "
                f"({bad} of {int(mask.sum())} tokens on this rank): the weights overflowed in an earlier "
                f"update (see actor/grad_norm and actor/lr in metrics.jsonl). These weights are not "
                f"checkpointed; resume from {latest or 'the initial model'} with a lower actor.optim.lr "
                f"(now {self.cfg.actor.optim.lr}) or a tighter actor.optim.clip_grad"
            )

    def _guard_mismatch(self, local_gap: float) -> dict[str, float]:
        """Never train off-policy silently: a fresh-sample gap above ``rollout.max_mismatch`` is
        logged loudly and the weights are re-verified (checksums, then the function probe), which
        stops the run if the engine has drifted; a gap that persists into the next step stops it too.

        Runs before the update, when the engine holds exactly the actor's current weights.
        """
        from dapo_megatron.rollout.mismatch import LIKELY_CAUSES, RolloutMismatchError

        (gap,) = all_max([local_gap])  # each DP rank measured its own shard
        if gap <= self.max_mismatch:
            self._mismatch_breaches = 0
            return {"rollout/mismatch_breaches": 0.0}
        self._mismatch_breaches += 1
        logger.error(
            "step %d: the engine's log-probs of its fresh samples differ from the actor's by %.3e per token "
            "(rollout/actor_mismatch_mean_abs_diff), above rollout.max_mismatch=%.1e: this step would train "
            "off-policy; re-verifying the engine's weights",
            self.step,
            gap,
            self.max_mismatch,
        )
        if self._mismatch_breaches > 1:
            raise RolloutMismatchError(
                f"step {self.step}: the rollout/actor log-prob gap stayed above rollout.max_mismatch="
                f"{self.max_mismatch:.1e} for {self._mismatch_breaches} steps (now {gap:.3e} per token) although "
                f"the weights verified after the first; likely causes: {LIKELY_CAUSES}"
            )
        verified = self._reverify_engine()
        logger.error(
            "step %d: re-verification passed (%d tensors, probe gap %.3e); the run stops if the next step's "
            "gap is above the threshold again",
            self.step,
            verified["weight_sync/verified_tensors"],
            verified["weight_sync/probe_mean_abs_diff"],
        )
        return {"rollout/mismatch_breaches": float(self._mismatch_breaches)}

    def _verify_engine(self) -> dict[str, float]:
        """Checksums of every engine tensor, then the function probe; raises on a mismatch (collective)."""
        from dapo_megatron.rollout.mismatch import LIKELY_CAUSES, RolloutMismatchError
        from dapo_megatron.rollout.sampling import train_sampling
        from dapo_megatron.rollout.vllm_engine import torch_dtype
        from dapo_megatron.weight_sync.probe import probe_policy
        from dapo_megatron.weight_sync.sync import verify_weights

        cfg = self.cfg
        checked = verify_weights(self.actor.model, self.hf_config, self.engine, dtype=torch_dtype(cfg.rollout.dtype))
        spec = train_sampling(cfg.rollout, min(16, cfg.data.max_response_length))
        probe = probe_policy(
            self.engine, self.actor, self.probe_prompts, spec, seed=cfg.rollout.seed + 7919, pad_id=self.pad_id
        )
        # An infinite gap is the actor's own overflow, not the engine's: the next step's
        # finite-policy check stops the run with that cause, without checkpointing the weights.
        if math.isfinite(probe.mean_abs_diff) and probe.mean_abs_diff > self.max_mismatch:
            reason = (
                f"function check at step {self.step}: with verified weights the engine's log-probs of "
                f"{probe.tokens} probe tokens differ from the actor's by {probe.mean_abs_diff:.3e} per token "
                f"(max {probe.max_abs_diff:.3e}), above rollout.max_mismatch={self.max_mismatch:.1e}"
            )
            self.engine.mark_broken(reason)
            raise RolloutMismatchError(f"{reason}; likely causes: {LIKELY_CAUSES}")
        return {
            "weight_sync/verified_tensors": float(checked),
            "weight_sync/probe_mean_abs_diff": probe.mean_abs_diff,
            "weight_sync/probe_max_abs_diff": probe.max_abs_diff,
        }

    def _actor_mfu(self, seq_lengths: list[int], seconds: float) -> float:
        """Model FLOPs of this DP rank's share x DP size, over the whole job's peak for that time."""
        from dapo_megatron.plan_memory import model_shape_from_hf, model_training_flops

        shape = model_shape_from_hf(self.hf_config)
        flops = model_training_flops(shape, seq_lengths, epochs=self.cfg.actor.ppo_epochs) * self.dp_size
        world = dist.get_world_size()
        return flops / max(seconds, 1e-9) / (world * self.cfg.trainer.gpu_peak_tflops * 1e12)

    def _enter(self, phase: Phase) -> None:
        self.lifecycle.enter(phase)

    def _refresh_engine(self) -> dict[str, float]:
        """From TRAIN (or start-up) to ROLLOUT: the engine gets the actor's weights, verified
        when configured (see :mod:`dapo_megatron.lifecycle` for what moves in each phase)."""
        self._enter(Phase.SYNC)
        metrics = self._sync_weights()
        if self.cfg.rollout.weight_sync.verify:
            self._enter(Phase.VERIFY)
            with self._timer("verify_weights"):
                metrics.update(self._verify_engine())
        self._enter(Phase.ROLLOUT)
        return metrics

    def _reverify_engine(self) -> dict[str, float]:
        """Verify, in the middle of TRAIN, the weights this step was sampled with.

        The engine is asleep here. A level-1 sleep kept its weights in host memory and waking
        restores them; a level-2 sleep discarded them, so they are refilled from the actor first,
        which still holds the same weights (the update has not run).
        """
        plan = self.lifecycle.plan
        if plan.free_cache_engine and plan.sleep_level == 2:
            self._enter(Phase.SYNC)
            self._sync_weights()
        self._enter(Phase.VERIFY)
        verified = self._verify_engine()
        self._enter(Phase.TRAIN)
        return verified

    def _sync_weights(self) -> dict[str, float]:
        from dapo_megatron.rollout.vllm_engine import torch_dtype
        from dapo_megatron.weight_sync.sync import sync_weights

        self.actor.require_resident(("params",), "sync weights to the engine")
        ws = self.cfg.rollout.weight_sync
        with self._timer("update_weights"):
            stats = sync_weights(
                self.actor.model,
                self.hf_config,
                self.transport,
                dtype=torch_dtype(self.cfg.rollout.dtype),
                bucket_size_mb=ws.bucket_size_mb,
            )
        return {
            "weight_sync/seconds": stats.seconds,
            "weight_sync/gbps": stats.gbps,
            "weight_sync/buckets": float(stats.buckets),
            "weight_sync/verified_tensors": 0.0,
            "weight_sync/stage_received_mb": stats.stage_received_bytes / (1 << 20),
        }

    def _validate(self) -> dict[str, float]:
        from dapo_megatron.validation import validate as run_validation

        if not self.val_set:
            return {}
        with self._timer("testing"):
            return run_validation(self.cfg, self.engine, self.pool, self.tokenizer, self.val_set)

    # ------------------------------------------------------------------ loop
    def _batch_metrics(self, groups: Sequence[Group], rounds: Sequence[experience.RoundResult]) -> dict[str, float]:
        scores = torch.tensor([s for g in groups for s in g.metrics["score"]])
        rewards = torch.tensor([s for g in groups for s in g.metrics["seq_reward"]])
        lengths = torch.tensor([len(r) for g in groups for r in g.payload.response_ids], dtype=torch.float32)
        prompt_lengths = torch.tensor([len(g.payload.prompt_ids) for g in groups], dtype=torch.float32)
        truncated = torch.tensor([t for g in groups for t in g.payload.truncated], dtype=torch.float32)
        gen_tokens = float(sum(int(r.lengths.sum()) for r in rounds))
        out = {
            "critic/score/mean": float(scores.mean()),
            "critic/score/max": float(scores.max()),
            "critic/score/min": float(scores.min()),
            "critic/rewards/mean": float(rewards.mean()),
            "critic/rewards/max": float(rewards.max()),
            "critic/rewards/min": float(rewards.min()),
            "response_length/mean": float(lengths.mean()),
            "response_length/max": float(lengths.max()),
            "response_length/min": float(lengths.min()),
            "response_length/clip_ratio": float(truncated.mean()),
            "prompt_length/mean": float(prompt_lengths.mean()),
            "prompt_length/max": float(prompt_lengths.max()),
            "prompt_length/min": float(prompt_lengths.min()),
            "rollout/generated_tokens": gen_tokens,
        }
        # over the whole batch (every rank holds all groups), not one data-parallel shard
        adv = experience.advantages_for(groups, norm_by_std=self.cfg.algorithm.norm_adv_by_std)
        out.update(verl_metrics.advantage_metrics(adv, lengths.long().tolist()))
        if rounds:  # carried-over groups can fill a step without any new generation
            out["rollout/acc_all_generated"] = float(torch.cat([r.scores for r in rounds]).gt(0).float().mean())
        return out

    def _pool_metrics(self) -> dict[str, float]:
        """Each rank scored a slice: counts and seconds are summed over ranks."""
        local = self.pool.metrics()
        keys = sorted(local)
        return dict(zip(keys, all_sum([local[k] for k in keys]), strict=True))

    def _log(self, metrics: dict[str, float]) -> None:
        if self.tracker is not None:
            self.tracker.log(metrics, step=self.step)

    def fit(self) -> dict[str, float]:
        """Run to total_training_steps; returns the last step's metrics."""
        cfg = self.cfg.trainer
        if cfg.val_only:
            val = self._validate()
            if not val:
                raise ValueError("trainer.val_only=true needs data.val_files")
            self._log({**val, "timing_s/testing": self.timings.pop("testing", 0.0)})
            return val
        if self.step == 0 and cfg.val_before_train:
            val = self._validate()
            if val:
                self._log({**val, "timing_s/testing": self.timings.pop("testing", 0.0)})
        metrics: dict[str, float] = {}
        bar = None
        if self.is_logger and "console" in cfg.logger:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc="dapo", unit="step", dynamic_ncols=True)
        from dapo_megatron.actor.actor import NonFiniteUpdateError

        while self.step < self.total_steps:
            self.step += 1
            self.timings.clear()
            t0 = time.perf_counter()
            groups, rounds = self._collect_batch()  # Phase.ROLLOUT
            metrics = self._batch_metrics(groups, rounds)
            metrics.update(self.buffer.metrics())
            self._enter(Phase.TRAIN)
            try:
                metrics.update(self._train_on(groups))
            except NonFiniteUpdateError:
                # Skipped steps left the weights at the last finite update: keep them and the
                # data position, so a fixed config resumes exactly here.
                logger.exception("non-finite updates at step %d; checkpointing before stopping", self.step)
                self.save_checkpoint()
                raise
            metrics.update(self._pool_metrics())
            metrics["train/epoch"] = float(self.sampler.epoch)
            stop = self._stop_agreed()
            save_freq = cfg.checkpoint.save_freq
            pending = None
            if stop or (save_freq > 0 and (self.step % save_freq == 0 or self.step == self.total_steps)):
                # Written while the engine sleeps and the actor holds everything the save reads;
                # committed (``latest`` moved) only after this step's row is logged below, so a
                # crash in between resumes from the previous checkpoint and redoes the whole step
                # (a resume drops rows past its step): no row is lost, none is written twice.
                pending = self.save_checkpoint(commit=False)
            metrics.update(self._refresh_engine())
            if cfg.test_freq > 0 and (self.step % cfg.test_freq == 0 or self.step == self.total_steps):
                metrics.update(self._validate())
            step_time = time.perf_counter() - t0
            metrics.update({f"timing_s/{k}": v for k, v in self.timings.items()})
            metrics.update({f"timing_s/lifecycle/{k}": v for k, v in self.lifecycle.pop_timings().items()})
            metrics["timing_s/step"] = step_time
            metrics["perf/time_per_step"] = step_time
            metrics.update(
                verl_metrics.throughput_metrics(
                    [len(g.payload.prompt_ids) for g in groups for _ in g.payload.response_ids],
                    [len(r) for g in groups for r in g.payload.response_ids],
                    step_seconds=step_time,
                    num_gpus=dist.get_world_size() if dist.is_initialized() else 1,
                    generated_tokens=metrics["rollout/generated_tokens"],
                    dp_size=self.dp_size,
                )
            )
            metrics.update(verl_metrics.progress_metrics(self.step, self.sampler.epoch))
            self._log(metrics)
            if pending is not None:
                self.commit_checkpoint(pending)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    score=f"{metrics['critic/score/mean']:+.2f}",
                    entropy=f"{metrics.get('actor/entropy', float('nan')):.2f}",
                    rounds=int(metrics["train/num_gen_batches"]),
                    s_per_step=f"{step_time:.1f}",
                )
            if stop:
                raise StopRequested(f"stopped by signal {self._stop_signal} after step {self.step}")
        if bar is not None:
            bar.close()
        return metrics

    def _stop_agreed(self) -> bool:
        """All ranks stop together if any received a pre-emption signal."""
        stop = any_true(self._stop_signal is not None)
        if stop and self._stop_signal is None:
            self._stop_signal = -1
        return stop

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
        self.pool.close()


STARTUP_ERROR_EXIT_CODE = 2


def _startup_errors() -> tuple[type[Exception], ...]:
    """Errors whose message says everything (the key, the file, the checkpoint and what is wrong)."""
    from dapo_megatron.actor.checkpoint import CheckpointIntegrityError, CheckpointMismatchError
    from dapo_megatron.config import ConfigError
    from dapo_megatron.data.parquet_dataset import DataError

    return (ConfigError, DataError, CheckpointIntegrityError, CheckpointMismatchError)


def main(argv: Sequence[str] | None = None, trainer_cls: type[DapoTrainer] = DapoTrainer) -> int:
    """Train; a user error found at start-up is printed once, by rank 0, without a traceback.

    Why: every rank meets the same bad key, file or checkpoint, so before this each of them
    printed the same full traceback and the one line that mattered was buried.  The others
    exit quietly with the same code (torchrun reports it).  Anything unexpected, and
    anything raised once training runs, keeps its traceback on every rank.
    """
    import argparse

    from dapo_megatron.config import explain, load_config

    parser = argparse.ArgumentParser(description="DAPO training (run under torchrun)")
    parser.add_argument("--config", required=True)
    parser.add_argument(
        "--explain", action="store_true", help="print the resolved config and what each verl key became; no training"
    )
    parser.add_argument("overrides", nargs="*", help="key.sub=value, ours or verl's")
    args = parser.parse_args(argv)
    if args.explain:
        print(explain(args.config, args.overrides), end="")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        trainer = trainer_cls(cfg)
        trainer.setup()
    except _startup_errors() as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return STARTUP_ERROR_EXIT_CODE
    try:
        trainer.fit()
    except StopRequested as stop:
        logger.warning("%s; re-run the same command to resume", stop)
    finally:
        trainer.close()
    return 0
