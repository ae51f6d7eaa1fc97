"""Dynamic sampling: train only on prompt groups whose rewards differ.

A group whose samples all got the same accuracy has zero GRPO advantage, so it
adds no gradient but still dilutes the token-mean loss. DAPO keeps generating
rounds of prompts until ``train_batch_size`` informative groups are collected.

Compared with the verl recipe this buffer fixes what users complain about:

* the stop condition is explicit (``should_generate``), so a trainer loop can
  neither spin forever nor miscount steps: generation rounds are counted per
  training step and never advance the LR schedule;
* surplus kept groups can be carried into the next step(s) instead of being
  thrown away (``max_carry_age``; 0 reproduces verl's discard);
* the carried groups and counters are part of ``state_dict`` so a resume loses
  no generated rollouts;
* the std threshold is a tolerance, not an exact float-zero comparison;
* the filter reads the metric the caller names (``acc`` by default), never the
  overlong-shaped reward, unless asked to.

The buffer holds :class:`~dapo_megatron.contract.Group` objects and checkpoints them whole.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from dapo_megatron.algo import FILTER_METRICS, ON_EXHAUSTED
from dapo_megatron.contract import Group

logger = logging.getLogger(__name__)

_STATE_VERSION = 2  # load_state_dict also reads version 1: see _group_from_v1
_COUNTERS: tuple[str, ...] = (
    "num_gen_batches",
    "kept_groups",
    "filtered_groups",
    "expired_groups",
    "generated_samples",
    "trained_samples",
    "partial_batch",
    "carried_in_groups",
)


class DynamicSamplingExhausted(RuntimeError):
    """Too few informative groups after the allowed number of generation rounds."""


def _fresh_counters() -> dict[str, int]:
    return dict.fromkeys(_COUNTERS, 0)


class DynamicSamplingBuffer:
    """Collects kept groups over generation rounds; hands out exact train batches.

    Typical use per training step::

        buffer.begin_step(step)
        while buffer.should_generate():
            buffer.add_round(generate_round())
        batch = buffer.take()          # raises DynamicSamplingExhausted if short
        log(buffer.metrics())
    """

    def __init__(
        self,
        train_batch_size: int,
        *,
        enable: bool = True,
        metric: str = "acc",
        std_tolerance: float = 1e-6,
        max_num_gen_batches: int = 10,
        on_exhausted: str = "raise",
        max_carry_age: int = 0,
    ) -> None:
        if train_batch_size <= 0:
            raise ValueError(f"train_batch_size must be > 0, got {train_batch_size}")
        if metric not in FILTER_METRICS:
            raise ValueError(f"metric must be one of {FILTER_METRICS}, got {metric!r}")
        if on_exhausted not in ON_EXHAUSTED:
            raise ValueError(f"on_exhausted must be one of {ON_EXHAUSTED}, got {on_exhausted!r}")
        if max_carry_age < 0:
            raise ValueError(f"max_carry_age must be >= 0, got {max_carry_age}")
        if max_num_gen_batches < 0:
            raise ValueError(f"max_num_gen_batches must be >= 0 (0 = unlimited), got {max_num_gen_batches}")
        if not std_tolerance >= 0:
            raise ValueError(f"std_tolerance must be >= 0, got {std_tolerance}")
        self.train_batch_size = train_batch_size
        self.enable = enable
        self.metric = metric
        self.std_tolerance = std_tolerance
        self.max_num_gen_batches = max_num_gen_batches
        self.on_exhausted = on_exhausted
        self.max_carry_age = max_carry_age

        self._kept: list[Group] = []  # oldest first
        self._step: int | None = None
        self._taken = False
        self._counters = _fresh_counters()

    # ------------------------------------------------------------------ steps
    def begin_step(self, step: int) -> None:
        """Open training step ``step``: reset per-step counters, expire old carries.

        Steps must increase: the age of a carried group is measured in steps, and
        a step that goes backwards means a resume from the wrong checkpoint.
        """
        if self._step is not None and step <= self._step:
            raise ValueError(f"step must increase: begin_step({step}) after step {self._step}")
        self._step = step
        self._taken = False
        self._counters = _fresh_counters()
        alive = [g for g in self._kept if step - g.born_step <= self.max_carry_age]
        self._counters["expired_groups"] = len(self._kept) - len(alive)
        self._kept = alive

    def _require_step(self, what: str) -> int:
        if self._step is None:
            raise RuntimeError(f"call begin_step() before {what}()")
        if self._taken:
            raise RuntimeError(f"{what}() after take() in step {self._step}; call begin_step() first")
        return self._step

    # ------------------------------------------------------------- filtering
    def _group_is_kept(self, group: Group) -> bool:
        """Population std (ddof=0, as np.std) above the tolerance, or a lone sample."""
        if not self.enable:
            return True
        values = np.asarray(getattr(group, self.metric), dtype=np.float64)
        return values.size == 1 or float(np.std(values)) > self.std_tolerance

    def _validate_group(self, group: Group) -> None:
        """Sizes are the group's own check; the buffer adds what only filtering needs."""
        if not isinstance(group, Group):
            raise TypeError(f"the buffer holds contract.Group objects, got {type(group).__name__}")
        if self.enable and not all(math.isfinite(float(v)) for v in getattr(group, self.metric)):
            raise ValueError(f"group {group.uid!r} has a non-finite {self.metric!r} value")

    def add_round(self, groups: Sequence[Group]) -> None:
        """Record one generation round: count it, filter its groups, keep the rest.

        The whole round is validated before anything changes, so a bad group
        leaves the buffer exactly as it was. The round limit is not enforced
        here: ``should_generate`` is the stop rule, and a round that was already
        generated is better kept than thrown away.
        """
        step = self._require_step("add_round")
        seen = {g.uid for g in self._kept}
        for group in groups:
            self._validate_group(group)
            if group.uid in seen:
                raise ValueError(f"duplicate group uid {group.uid!r} in the buffer")
            seen.add(group.uid)

        counters = self._counters
        counters["num_gen_batches"] += 1
        for group in groups:
            counters["generated_samples"] += group.size
            if self._group_is_kept(group):
                group.born_step = step
                self._kept.append(group)
                counters["kept_groups"] += 1
            else:
                counters["filtered_groups"] += 1

    # ----------------------------------------------------------- hand-out
    def ready(self) -> bool:
        """Enough kept groups for one training batch."""
        return len(self._kept) >= self.train_batch_size

    def rounds_left(self) -> bool:
        """Whether another generation round is allowed in this step."""
        limit = self.max_num_gen_batches
        return limit == 0 or self._counters["num_gen_batches"] < limit

    def should_generate(self) -> bool:
        """Not ready yet and another round is allowed in this step."""
        return not self.ready() and self.rounds_left()

    def take(self) -> list[Group]:
        """Exactly ``train_batch_size`` groups, oldest first; keep the surplus.

        Surplus groups that would be older than ``max_carry_age`` at the next
        step are dropped now (counted as expired) rather than held in memory and
        checkpointed for nothing; with ``max_carry_age=0`` this is verl's discard.
        """
        step = self._require_step("take")
        counters = self._counters
        if self.ready():
            batch, surplus = (
                self._kept[: self.train_batch_size],
                self._kept[self.train_batch_size :],
            )
        elif self.rounds_left():
            raise RuntimeError(
                f"take() called with {len(self._kept)}/{self.train_batch_size} groups kept while "
                "generation rounds remain; loop while should_generate() first"
            )
        else:
            message = (
                f"dynamic sampling exhausted at step {step}: {len(self._kept)} of "
                f"{self.train_batch_size} groups kept after {counters['num_gen_batches']} "
                f"generation rounds (max_num_gen_batches={self.max_num_gen_batches}); raise "
                "max_num_gen_batches or gen_batch_size, or lower train_batch_size"
            )
            if self.on_exhausted == "raise":
                raise DynamicSamplingExhausted(message + ", or set on_exhausted='train_partial'")
            if not self._kept:
                raise DynamicSamplingExhausted(message + " (train_partial has no group to train on)")
            batch, surplus = self._kept, []
            counters["partial_batch"] = 1
            logger.warning("%s; training on the partial batch (on_exhausted='train_partial')", message)

        carried = [g for g in surplus if step + 1 - g.born_step <= self.max_carry_age]
        counters["expired_groups"] += len(surplus) - len(carried)
        counters["carried_in_groups"] = sum(g.born_step < step for g in batch)
        counters["trained_samples"] = sum(g.size for g in batch)
        self._kept = carried
        self._taken = True
        return batch

    # ------------------------------------------------------------ reporting
    def __len__(self) -> int:
        return len(self._kept)

    @property
    def pending(self) -> tuple[Group, ...]:
        """Kept groups not handed out yet, oldest first (read-only view)."""
        return tuple(self._kept)

    def metrics(self) -> dict[str, float]:
        """Per-step counters (the rounds under verl's ``train/num_gen_batches``); "carried_groups"
        is what the buffer holds now."""
        out = {f"dynamic_sampling/{k}": float(v) for k, v in self._counters.items() if k != "num_gen_batches"}
        out["dynamic_sampling/carried_groups"] = float(len(self._kept))
        out["train/num_gen_batches"] = float(self._counters["num_gen_batches"])
        return out

    # ---------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Carried groups, step and counters as plain containers.

        Plain dicts/lists (no ``Group`` objects) so the checkpoint loads with
        ``torch.load(weights_only=True)``.
        """
        return {
            "version": _STATE_VERSION,
            "step": self._step,
            "taken": self._taken,
            "counters": dict(self._counters),
            "groups": [dataclasses.asdict(g) for g in self._kept],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; the constructor config stays as built.

        The config is not restored so a resume may change e.g. the batch size;
        carried groups then still expire by their recorded ``born_step``.
        """
        version = state.get("version")
        if version not in (1, _STATE_VERSION):
            raise ValueError(f"unsupported DynamicSamplingBuffer state version {version!r}")
        counters = _fresh_counters()
        unknown = set(state["counters"]) - set(_COUNTERS)
        if unknown:
            raise ValueError(f"unknown dynamic-sampling counters in state: {sorted(unknown)}")
        counters.update({k: int(v) for k, v in state["counters"].items()})
        groups = [Group(**(_group_from_v1(g) if version == 1 else g)) for g in state["groups"]]
        self._step = None if state["step"] is None else int(state["step"])
        self._taken = bool(state["taken"])
        self._counters = counters
        self._kept = groups

    def drop_carried_unlike(self, group_size: int, max_response_length: int) -> int:
        """Drop carried groups that a resume's changed settings cannot train on; return how many.

        A resume may change ``rollout.n`` or ``data.max_response_length``. A carried group of
        the old size cannot share a batch with the new groups, and a response longer than the
        new cap does not fit the actor batch's rows; either would fail mid-step, after the
        step's generation.
        """
        fits = [
            g for g in self._kept if g.size == group_size and all(len(r) <= max_response_length for r in g.response_ids)
        ]
        dropped = len(self._kept) - len(fits)
        self._kept = fits
        return dropped


def _group_from_v1(g: dict[str, Any]) -> dict[str, Any]:
    """The :class:`Group` fields of a version-1 group, which kept the per-response values in
    ``metrics[name]`` and the samples in a ``payload`` dict, so that older checkpoints resume."""
    try:
        samples = {k: g["payload"][k] for k in ("prompt_ids", "response_ids", "rollout_log_probs", "truncated")}
        metrics = {k: g["metrics"][k] for k in ("acc", "score", "seq_reward")}
    except (KeyError, TypeError) as exc:
        raise ValueError(f"checkpointed group {g.get('uid')!r} is not a version-1 trainer group: {exc!r}") from exc
    return {"uid": g["uid"], "born_step": int(g["born_step"]), **samples, **metrics}
