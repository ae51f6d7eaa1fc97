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

import argparse
import dataclasses
import logging
import math
import os
import random
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from dapo_megatron import experience
from dapo_megatron.actor.actor import NonFinitePolicyError, NonFiniteUpdateError
from dapo_megatron.algo.rollout_correction import rollout_corr_metrics_over_ranks, truncated_is_weights
from dapo_megatron.builder import Builder
from dapo_megatron.checkpoint.metadata import CheckpointMismatchError
from dapo_megatron.checkpoint.verify import CheckpointIntegrityError
from dapo_megatron.config import ConfigError, DapoConfig, explain, load_config
from dapo_megatron.contract import Group, RoundResult
from dapo_megatron.data.parquet_dataset import DataError
from dapo_megatron.distributed import all_max, all_sum, any_true, world_size
from dapo_megatron.lifecycle import Phase
from dapo_megatron.observability import verl_metrics
from dapo_megatron.parts import Parts, Tracker, WeightSync
from dapo_megatron.planning.memory import model_shape_from_hf, model_training_flops
from dapo_megatron.preemption import on_stop_signal
from dapo_megatron.reward.sharded import score_sharded
from dapo_megatron.rollout.engine import RolloutEngine
from dapo_megatron.rollout.mismatch import LIKELY_CAUSES, RolloutMismatchError, logprob_mismatch, max_mismatch_for
from dapo_megatron.rollout.sampling import train_sampling
from dapo_megatron.validation import validate as run_validation
from dapo_megatron.weight_sync.probe import probe_policy

logger = logging.getLogger(__name__)

TRAINER_STATE_VERSION = 1


class StopRequested(Exception):
    """Raised out of the loop after a pre-emption signal was honoured (checkpoint written)."""


class DapoTrainer:
    """The loop over :class:`~dapo_megatron.parts.Parts`: build them with
    :class:`~dapo_megatron.builder.Builder` (or stand-ins), then :meth:`start` and :meth:`fit`."""

    def __init__(self, cfg: DapoConfig, parts: Parts) -> None:
        self.cfg = cfg
        self.parts = parts
        self.is_logger = parts.rank == 0
        self.max_mismatch = max_mismatch_for(cfg.rollout.max_mismatch, cfg.rollout.dtype, cfg.actor.params_dtype)
        self._mismatch_breaches = 0
        # the function check's prompts: fixed, so probe gaps are comparable across steps
        probe_count = min(cfg.rollout.weight_sync.probe_prompts, len(parts.train_set))
        self.probe_prompts = [parts.train_set[i].prompt_ids for i in range(probe_count)]
        self.step = 0
        self.engine: RolloutEngine | None = None  # built in start()
        self.weight_sync: WeightSync | None = None
        self.tracker: Tracker | None = None
        self.timings: dict[str, float] = defaultdict(float)
        self._stop_signal: int | None = None

    # ------------------------------------------------------------------ start
    def start(self) -> None:
        """Resume (when a checkpoint was chosen), build the engine in the memory the actor gave
        back, give it the actor's weights when it needs them, open the tracker (collective)."""
        resumed = self._maybe_resume()
        # The actor hands back what it does not hold while the engine generates before the
        # engine is built: vLLM's start-up check wants gpu_memory_utilization x HBM free.
        self._enter(Phase.ROLLOUT)
        self.engine = self.parts.build_engine()
        self.parts.lifecycle.attach_engine(self.engine)
        self.weight_sync = self.parts.build_weight_sync(self.engine)
        if self._engine_needs_actor_weights(resumed):
            self._refresh_engine(startup=True)
            logger.info("engine weights synced from the actor (%s)", "resumed" if resumed else "dummy start")
        self.timings.clear()
        if self.is_logger:
            self.tracker = self.parts.build_tracker(self.step if resumed else None)
        on_stop_signal(self._on_signal)

    def _engine_needs_actor_weights(self, resumed: bool) -> bool:
        """Before any validation or generation: a dummy-started engine holds random weights, and
        after a resume the engine holds the HF checkpoint's, not the resumed actor's."""
        return resumed or self.engine.load_format == "dummy"

    def _on_signal(self, signum: int) -> None:
        logger.warning("received signal %d: checkpointing after the current step, then exiting", signum)
        self._stop_signal = signum

    # ------------------------------------------------------------------ resume
    def _trainer_state(self) -> dict:
        return {
            "version": TRAINER_STATE_VERSION,
            "step": self.step,
            "sampler": self.parts.sampler.state_dict(),
            "buffer": self.parts.buffer.state_dict(),
            "actor_update_count": self.parts.actor.update_count,
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
            },
        }

    def _maybe_resume(self) -> bool:
        path = self.parts.resume_from
        if path is None:
            return False
        state = self.parts.checkpoints.load(path)
        if not state or state.get("version") != TRAINER_STATE_VERSION:
            raise ValueError(f"checkpoint {path} has no trainer state of version {TRAINER_STATE_VERSION}")
        self.step = int(state["step"])
        self.parts.sampler.load_state_dict(state["sampler"])
        self.parts.buffer.load_state_dict(state["buffer"])
        cfg = self.cfg
        dropped = self.parts.buffer.drop_carried_unlike(cfg.rollout.n, cfg.data.max_response_length)
        if dropped:
            logger.warning(
                "dropped %d carried dynamic-sampling group(s) from %s: sampled with another rollout.n or a "
                "longer data.max_response_length than this run's (%d, %d)",
                dropped,
                path,
                cfg.rollout.n,
                cfg.data.max_response_length,
            )
        self.parts.actor.update_count = int(state["actor_update_count"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
        logger.info("resumed from %s at step %d", path, self.step)
        return True

    def save_checkpoint(self, *, commit: bool = True):
        """Write the checkpoint of this step; ``commit=False`` leaves ``latest`` for
        :meth:`commit_checkpoint` (returns the pending checkpoint)."""
        self.parts.actor.require_resident(("params", "optimizer"), "save a checkpoint")
        with self._timer("save_checkpoint"):
            return self.parts.checkpoints.save(self.step, self._trainer_state(), commit=commit)

    def commit_checkpoint(self, pending) -> Path:
        with self._timer("save_checkpoint"):
            return self.parts.checkpoints.commit(pending)

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

    def _generate_round(self, round_index: int) -> RoundResult:
        cfg = self.cfg
        records = [self.parts.train_set[i] for i in self.parts.sampler.next_batch(cfg.data.gen_batch_size)]
        spec = train_sampling(cfg.rollout, cfg.data.max_response_length)
        with self._timer("gen"):
            rollouts = self.engine.generate(
                [r.prompt_ids for r in records], cfg.rollout.n, spec, self._generation_seed(round_index)
            )
        with self._timer("reward"):
            texts = self.parts.tokenizer.batch_decode(rollouts.response_ids, skip_special_tokens=True)
            truths = [r.ground_truth for r in records for _ in range(cfg.rollout.n)]
            contexts = [(r.data_source, r.extra_info) for r in records for _ in range(cfg.rollout.n)]
            scored = score_sharded(self.parts.pool, texts, truths, contexts)
        return experience.build_round(cfg, records, rollouts, scored, draw=f"{self.step}.{round_index}")

    def _collect_batch(self) -> tuple[list[Group], list[RoundResult]]:
        self.parts.buffer.begin_step(self.step)
        rounds = []
        while self.parts.buffer.should_generate():
            result = self._generate_round(len(rounds))
            self.parts.buffer.add_round(result.groups)
            rounds.append(result)
        groups = self.parts.buffer.take()
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
        cfg = self.cfg
        mine = experience.dp_shard(
            groups,
            mini_batch_groups=cfg.actor.ppo_mini_batch_size,
            dp_size=self.parts.dp_size,
            dp_rank=self.parts.dp_rank,
        )
        with self._timer("adv"):
            adv = experience.advantages_for(mine, norm_by_std=cfg.algorithm.norm_adv_by_std)
            batch = experience.to_actor_batch(
                mine,
                max_response_length=cfg.data.max_response_length,
                pad_token_id=self.parts.pad_id,
                mask_truncated=cfg.algorithm.mask_truncated_responses,
                advantages=adv,
            )
        with self._timer("old_log_prob"):
            old, _ = self.parts.actor.compute_log_probs(batch, compute_entropy=False)
        metrics: dict[str, float] = {}
        mask = batch.response_mask.bool()
        self._require_finite_policy(old, mask)
        rollout_lp = experience.rollout_log_probs(mine, cfg.data.max_response_length)
        # Groups carried over from an earlier step were sampled by earlier weights: their gap
        # is off-policy staleness, not a sync error, so it gets its own metric.
        born = torch.tensor([g.born_step for g in mine for _ in g.response_ids])
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
            metrics.update(self.parts.actor.update(batch))
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
        bad = int((~torch.isfinite(old_log_probs) & mask).sum())
        if any_true(bad > 0):
            latest = self.parts.checkpoints.latest()
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
        cfg = self.cfg
        checked = self.weight_sync.verify()
        spec = train_sampling(cfg.rollout, min(16, cfg.data.max_response_length))
        probe = probe_policy(
            self.engine,
            self.parts.actor,
            self.probe_prompts,
            spec,
            seed=cfg.rollout.seed + 7919,
            pad_id=self.parts.pad_id,
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
        shape = model_shape_from_hf(self.parts.hf_config)
        flops = model_training_flops(shape, seq_lengths, epochs=self.cfg.actor.ppo_epochs) * self.parts.dp_size
        world = dist.get_world_size()
        return flops / max(seconds, 1e-9) / (world * self.cfg.trainer.gpu_peak_tflops * 1e12)

    def _enter(self, phase: Phase) -> None:
        self.parts.lifecycle.enter(phase)

    def _refresh_engine(self, startup: bool = False) -> dict[str, float]:
        """From TRAIN (or start-up) to ROLLOUT: the engine gets the actor's weights, verified
        when configured (see :mod:`dapo_megatron.lifecycle` for what moves in each phase)."""
        self._enter(Phase.SYNC)
        metrics = self._sync_weights()
        ws = self.cfg.rollout.weight_sync
        due = startup or self.step % ws.verify_freq == 0 or self.step == self.parts.total_steps
        if ws.verify and due:
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
        plan = self.parts.lifecycle.plan
        if plan.free_cache_engine and plan.sleep_level == 2:
            self._enter(Phase.SYNC)
            self._sync_weights()
        self._enter(Phase.VERIFY)
        verified = self._verify_engine()
        self._enter(Phase.TRAIN)
        return verified

    def _sync_weights(self) -> dict[str, float]:
        self.parts.actor.require_resident(("params",), "sync weights to the engine")
        with self._timer("update_weights"):
            stats = self.weight_sync.sync()
        return {
            "weight_sync/seconds": stats.seconds,
            "weight_sync/gbps": stats.gbps,
            "weight_sync/buckets": float(stats.buckets),
            "weight_sync/verified_tensors": 0.0,
            "weight_sync/stage_received_mb": stats.stage_received_bytes / (1 << 20),
        }

    def _validate(self) -> dict[str, float]:
        if not self.parts.val_set:
            return {}
        with self._timer("testing"):
            return run_validation(self.cfg, self.engine, self.parts.pool, self.parts.tokenizer, self.parts.val_set)

    # ------------------------------------------------------------------ loop
    def _batch_metrics(self, groups: Sequence[Group], rounds: Sequence[RoundResult]) -> dict[str, float]:
        lengths = torch.tensor([len(r) for g in groups for r in g.response_ids], dtype=torch.float32)
        out = {}
        for name, values in (
            ("critic/score", [s for g in groups for s in g.score]),
            ("critic/rewards", [s for g in groups for s in g.seq_reward]),
            ("response_length", lengths),
            ("prompt_length", [len(g.prompt_ids) for g in groups]),
        ):
            v = torch.as_tensor(values, dtype=torch.float32)
            out.update({f"{name}/mean": float(v.mean()), f"{name}/max": float(v.max()), f"{name}/min": float(v.min())})
        truncated = torch.tensor([t for g in groups for t in g.truncated], dtype=torch.float32)
        out["response_length/clip_ratio"] = float(truncated.mean())
        out["rollout/generated_tokens"] = float(sum(int(r.lengths.sum()) for r in rounds))
        # over the whole batch (every rank holds all groups), not one data-parallel shard
        adv = experience.advantages_for(groups, norm_by_std=self.cfg.algorithm.norm_adv_by_std)
        out.update(verl_metrics.advantage_metrics(adv, lengths.long().tolist()))
        if rounds:  # carried-over groups can fill a step without any new generation
            out["rollout/acc_all_generated"] = float(torch.cat([r.scores for r in rounds]).gt(0).float().mean())
        return out

    def _pool_metrics(self) -> dict[str, float]:
        """Each rank scored a slice: counts and seconds are summed over ranks."""
        local = self.parts.pool.metrics()
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
            bar = tqdm(total=self.parts.total_steps, initial=self.step, desc="dapo", unit="step", dynamic_ncols=True)
        while self.step < self.parts.total_steps:
            self.step += 1
            self.timings.clear()
            t0 = time.perf_counter()
            groups, rounds = self._collect_batch()  # Phase.ROLLOUT
            metrics = self._batch_metrics(groups, rounds)
            metrics.update(self.parts.buffer.metrics())
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
            metrics["train/epoch"] = float(self.parts.sampler.epoch)
            stop = self._stop_agreed()
            save_freq = cfg.checkpoint.save_freq
            pending = None
            if stop or (save_freq > 0 and (self.step % save_freq == 0 or self.step == self.parts.total_steps)):
                # Written while the engine sleeps and the actor holds everything the save reads;
                # committed (``latest`` moved) only after this step's row is logged below, so a
                # crash in between resumes from the previous checkpoint and redoes the whole step
                # (a resume drops rows past its step): no row is lost, none is written twice.
                pending = self.save_checkpoint(commit=False)
            metrics.update(self._refresh_engine())
            if cfg.test_freq > 0 and (self.step % cfg.test_freq == 0 or self.step == self.parts.total_steps):
                metrics.update(self._validate())
            step_time = time.perf_counter() - t0
            metrics.update({f"timing_s/{k}": v for k, v in self.timings.items()})
            metrics.update({f"timing_s/lifecycle/{k}": v for k, v in self.parts.lifecycle.pop_timings().items()})
            metrics["timing_s/step"] = step_time
            metrics["perf/time_per_step"] = step_time
            metrics.update(
                verl_metrics.throughput_metrics(
                    [len(g.prompt_ids) for g in groups for _ in g.response_ids],
                    [len(r) for g in groups for r in g.response_ids],
                    step_seconds=step_time,
                    num_gpus=world_size(),
                    generated_tokens=metrics["rollout/generated_tokens"],
                    dp_size=self.parts.dp_size,
                )
            )
            metrics.update(verl_metrics.progress_metrics(self.step, self.parts.sampler.epoch))
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
        self.parts.pool.close()


STARTUP_ERROR_EXIT_CODE = 2
STARTUP_ERROR_GRACE_S = 10.0


STARTUP_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    DataError,
    CheckpointIntegrityError,
    CheckpointMismatchError,
)
"""Errors whose message says everything (the key, the file, the checkpoint and what is wrong)."""


def _report_startup_error(exc: Exception, rank: int) -> None:
    """Rank 0 prints at once; another rank waits STARTUP_ERROR_GRACE_S first.

    torchrun stops every worker as soon as one exits. A rank that exited at once could get rank
    0 killed before it printed, and the job would end without its message. When every rank met
    the error, rank 0 prints and exits within the wait and torchrun stops the waiting ranks, so
    the message appears once. A rank still alive after the wait met an error that rank 0 did
    not (a file missing on its node), and prints it with its rank.
    """
    if rank != 0:
        time.sleep(STARTUP_ERROR_GRACE_S)
    where = "" if rank == 0 else f" (rank {rank})"
    print(f"error{where}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


def main(
    argv: Sequence[str] | None = None,
    trainer_cls: type[DapoTrainer] = DapoTrainer,
    builder_cls: type[Builder] = Builder,
) -> int:
    """Train; a user error found at start-up is printed once, by rank 0, without a traceback.

    Why: every rank meets the same bad key, file or checkpoint, so before this each of them
    printed the same full traceback and the one line that mattered was buried.  The others
    exit with the same code (torchrun reports it) after a grace that lets rank 0 print.
    Anything unexpected, and anything raised once training runs, keeps its traceback on every
    rank.
    """
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
        trainer = trainer_cls(cfg, builder_cls(cfg).build())
        trainer.start()
    except STARTUP_ERRORS as exc:
        _report_startup_error(exc, int(os.environ.get("RANK", "0")))
        return STARTUP_ERROR_EXIT_CODE
    try:
        trainer.fit()
    except StopRequested as stop:
        logger.warning("%s; re-run the same command to resume", stop)
    finally:
        trainer.close()
    return 0
