"""Light stand-ins for the trainer's parts (:mod:`dapo_megatron.parts`), for tests of the loop's logic.

They keep the contracts the real parts enforce where the loop could break them (the engine
refuses to generate asleep or to load weights with its weights asleep; the actor refuses to
work on state it offloaded), and append what is called to a shared ``log``, tagged with the
lifecycle phase it ran in.  The real parts run in tests/e2e (test_lifecycle_order.py records
the same calls on the real actor and engine).

Prompts and answers: prompt ``k`` is ``[10 + k, 11]``; the engine answers sample ``j`` of every
prompt with ``[3 + j, 1]`` at log-prob -0.5 per token, the actor agrees (-0.5), so no gap.  A
record whose ground truth is ``"mixed"`` is solved by its even samples (kept by dynamic
sampling), one whose ground truth is ``"none"`` by none (filtered out).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch

from dapo_megatron.actor.offload import empty_device_cache
from dapo_megatron.builder import Builder
from dapo_megatron.config import DapoConfig
from dapo_megatron.contract import PromptRecord, Rollouts, ScoredBatch
from dapo_megatron.data.sampler import ResumableSampler
from dapo_megatron.lifecycle import ColocatedLifecycle, LifecyclePlan
from dapo_megatron.parts import Parts
from dapo_megatron.rollout.engine import EngineUnusableError
from dapo_megatron.rollout.layout import RolloutLayout
from dapo_megatron.weight_sync.sync import SyncStats

LOGPROB = -0.5


class Log(list):
    """The calls, in order; ``phase`` is read from the lifecycle when one is attached."""

    lifecycle: ColocatedLifecycle | None = None

    def add(self, event: str) -> None:
        phase = self.lifecycle.phase.value if self.lifecycle is not None and self.lifecycle.phase else "-"
        self.append(f"{event}@{phase}")


def records(truths: Sequence[str], prefix: str = "p") -> list[PromptRecord]:
    return [
        PromptRecord(uid=f"{prefix}{k}", prompt_ids=[10 + k, 11], messages=[], ground_truth=truth, data_source="fake")
        for k, truth in enumerate(truths)
    ]


class FakeTokenizer:
    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        return [" ".join(map(str, s)) for s in sequences]


class FakeEngine:
    load_format = "auto"

    def __init__(self, log: Log, load_format: str = "auto") -> None:
        self.log = log
        self.load_format = load_format
        self.layout = RolloutLayout(world_size=1, rank=0, tp=1)
        self.asleep: set[str] = set()
        self.syncing = False
        self.calls: list[tuple[int, list[int]]] = []  # (n, [k of each prompt [10 + k, 11]])

    def generate(self, prompts, n, sampling, seed) -> Rollouts:
        if self.asleep or self.syncing:
            raise EngineUnusableError(f"generate while asleep {sorted(self.asleep)} / syncing {self.syncing}")
        self.log.add("engine.generate")
        self.calls.append((n, [p[0] - 10 for p in prompts]))
        return Rollouts(
            num_prompts=len(prompts),
            n=n,
            prompt_index=[i for i in range(len(prompts)) for _ in range(n)],
            response_ids=[[3 + j, 1] for _ in prompts for j in range(n)],
            logprobs=[[LOGPROB, LOGPROB] for _ in prompts for _ in range(n)],
            finish_reason=["stop"] * (len(prompts) * n),
        )

    def sleep(self, level: int = 1) -> None:
        self.log.add(f"engine.sleep({level})")
        self.asleep = {"weights", "kv_cache"}

    def wake_up(self, tags=None) -> None:
        tags = ["weights", "kv_cache"] if tags is None else list(tags)
        self.log.add(f"engine.wake_up({','.join(tags)})")
        self.asleep -= set(tags)

    def weight_slices(self) -> dict:
        return {}

    def begin_weight_update(self) -> None:
        if "weights" in self.asleep:
            raise EngineUnusableError("begin_weight_update with the weights asleep")
        self.log.add("engine.begin_weight_update")
        self.syncing = True

    def load_weight_bucket(self, named_tensors) -> None:
        assert self.syncing

    def finish_weight_update(self) -> None:
        assert self.syncing
        self.log.add("engine.finish_weight_update")
        self.syncing = False

    def engine_checksums(self) -> dict:
        if "weights" in self.asleep:
            raise EngineUnusableError("checksums with the weights asleep")
        self.log.add("engine.engine_checksums")
        return {}

    def mark_broken(self, reason: str) -> None:
        self.log.add("engine.mark_broken")


class FakeWeightSync:
    """Drives the engine's weight-update lifecycle as the real sync does, with one tiny bucket."""

    def __init__(self, engine: FakeEngine, actor: FakeActor) -> None:
        self.engine, self.actor = engine, actor

    def sync(self) -> SyncStats:
        self.actor.require_resident(("params",), "sync")
        self.engine.begin_weight_update()
        self.engine.load_weight_bucket([("w", torch.zeros(1))])
        self.engine.finish_weight_update()
        return SyncStats(tensors=1, bytes=4, buckets=1, seconds=0.0)

    def verify(self) -> int:
        self.engine.engine_checksums()
        return 1


class FakeActor:
    def __init__(self, log: Log) -> None:
        self.log = log
        self.update_count = 0
        self.resident = {"params", "grads", "optimizer"}
        self.updates: list[int] = []  # rows per update

    def require_resident(self, kinds, what: str) -> None:
        missing = set(kinds) - self.resident
        if missing:
            raise RuntimeError(f"cannot {what}: {sorted(missing)} offloaded")

    def compute_log_probs(self, batch, *, compute_entropy: bool = True):
        self.require_resident(("params",), "compute log-probs")
        self.log.add("actor.compute_log_probs")
        return torch.full(tuple(batch.response_mask.shape), LOGPROB), None

    def update(self, batch) -> dict[str, float]:
        self.require_resident(("params", "grads", "optimizer"), "update")
        self.log.add("actor.update")
        self.update_count += 1
        self.updates.append(int(batch.input_ids.shape[0]))
        return {"actor/pg_loss": 0.0, "actor/entropy": 1.0}

    def offload(self, kinds) -> None:
        self.log.add(f"actor.offload({','.join(kinds)})")
        self.resident -= set(kinds)

    def onload(self, kinds) -> None:
        self.log.add(f"actor.onload({','.join(kinds)})")
        self.resident |= set(kinds)


class FakeScorer:
    """``mixed``: even samples are right; anything else: none is."""

    def __init__(self) -> None:
        self.scored = 0

    def score(self, responses, ground_truths, contexts=None) -> ScoredBatch:
        acc = [t == "mixed" and int(r.split()[0]) % 2 == 1 for r, t in zip(responses, ground_truths, strict=True)]
        self.scored += len(responses)
        return ScoredBatch(
            scores=[1.0 if a else -1.0 for a in acc], acc=acc, preds=["x"] * len(acc), failed=[None] * len(acc)
        )

    def metrics(self) -> dict[str, float]:
        return {"reward/num_scored": float(self.scored)}

    def close(self) -> None:
        pass


class FakeCheckpoints:
    """Keeps saved trainer states in memory; ``committed`` is what ``latest`` would point at."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.saved: dict[int, dict] = {}
        self.committed: list[int] = []

    def load(self, path: Path) -> dict | None:
        self.log.add(f"ckpt.load({path.name})")
        return copy.deepcopy(self.saved[int(path.name.split("_")[1])])

    def save(self, step: int, extra_state: dict, *, commit: bool) -> int:
        self.log.add(f"ckpt.save({step})")
        self.saved[step] = copy.deepcopy(extra_state)
        if commit:
            self.committed.append(step)
        return step

    def commit(self, pending: int) -> Path:
        self.log.add(f"ckpt.commit({pending})")
        self.committed.append(pending)
        return Path(f"step_{pending}")

    def latest(self) -> Path | None:
        return Path(f"step_{self.committed[-1]}") if self.committed else None


class FakeTracker:
    def __init__(self, events: Log, resume_step: int | None) -> None:
        self.events, self.resume_step = events, resume_step
        self.rows: list[dict] = []

    def log(self, metrics, step: int) -> None:
        self.events.add(f"tracker.log({step})")
        self.rows.append({"step": step, **metrics})

    def close(self) -> None:
        pass


def tiny_config(tmp_path, **trainer) -> DapoConfig:
    """Two prompts a round, two groups a step of four samples each, a response budget of 8."""
    cfg = DapoConfig()
    cfg.trainer.output_dir = str(tmp_path)
    cfg.trainer.logger = ["jsonl"]
    cfg.trainer.total_training_steps = trainer.pop("total_steps", 4)
    cfg.trainer.test_freq = trainer.pop("test_freq", -1)
    cfg.trainer.val_before_train = trainer.pop("val_before_train", False)
    cfg.trainer.checkpoint.save_freq = trainer.pop("save_freq", -1)
    assert not trainer, trainer
    cfg.data.gen_batch_size = 2
    cfg.data.train_batch_size = 2
    cfg.data.max_prompt_length = 16
    cfg.data.max_response_length = 8
    cfg.algorithm.overlong_buffer.len = 4
    cfg.rollout.n = 4
    cfg.rollout.val.n = 2
    cfg.actor.ppo_mini_batch_size = 2
    cfg.rollout.weight_sync.verify = True
    cfg.rollout.weight_sync.probe_prompts = 2
    return cfg


def fake_parts(
    cfg: DapoConfig,
    log: Log | None = None,
    *,
    train_truths: Sequence[str] = ("mixed", "none") * 4,
    val_truths: Sequence[str] = (),
    checkpoints: FakeCheckpoints | None = None,
    resume_from: Path | None = None,
    load_format: str = "auto",
) -> Parts:
    """Parts for :class:`~dapo_megatron.trainer.DapoTrainer` on one process, all stand-ins but the
    sampler, the dynamic-sampling buffer and the lifecycle (plain logic, real)."""
    log = Log() if log is None else log
    actor = FakeActor(log)
    lifecycle = ColocatedLifecycle(LifecyclePlan.from_config(cfg), actor, empty_device_cache)
    log.lifecycle = lifecycle
    train = records(train_truths)
    parts = Parts(
        tokenizer=FakeTokenizer(),
        hf_config=None,
        pad_id=0,
        train_set=train,
        val_set=records(val_truths, prefix="v"),
        actor=actor,
        lifecycle=lifecycle,
        pool=FakeScorer(),
        sampler=ResumableSampler(len(train), seed=cfg.data.seed, shuffle=False),
        buffer=Builder(cfg).buffer(),  # config -> buffer needs nothing else
        checkpoints=checkpoints if checkpoints is not None else FakeCheckpoints(log),
        build_engine=lambda: FakeEngine(log, load_format),
        build_weight_sync=lambda engine: FakeWeightSync(engine, actor),
        build_tracker=lambda resume_step: FakeTracker(log, resume_step),
        total_steps=cfg.trainer.total_training_steps,
        resume_from=resume_from,
    )
    return parts
