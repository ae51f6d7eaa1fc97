"""Learning curves for comparing trainers: held-out accuracy against generated tokens and training seconds.

Why tokens on the x-axis: two RL trainers with the same batch settings can still
spend very different amounts of generation per training step (DAPO's dynamic
sampling regenerates until enough informative groups are found), so "accuracy at
step s" rewards the one that generates more. Generated response tokens are the
cost both pay; seconds are the other cost, but they also measure the engine and
the machine. Training seconds exclude validation and start-up on both sides, so
an evaluation schedule or a slow model load does not count as learning time.

"Tokens to reach" is the first evaluation at or above the target, not an
interpolation: it is an upper bound at the evaluation granularity, and every
number it reports is a measured point.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

# Accuracies are means of 0/1 samples; two equal ones may differ in the last bit.
_ACC_TOLERANCE = 1e-9


@dataclass(frozen=True)
class CurvePoint:
    """One held-out evaluation after ``step`` training steps, with the cost spent up to it."""

    step: int
    tokens: float
    seconds: float
    acc: float


@dataclass(frozen=True)
class Curve:
    """Evaluations in training order; costs are cumulative, so they never decrease."""

    name: str
    metric: str
    points: tuple[CurvePoint, ...]

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError(f"curve {self.name!r} has no evaluations")
        for prev, cur in zip(self.points, self.points[1:], strict=False):
            if cur.step <= prev.step:
                raise ValueError(f"curve {self.name!r}: steps must increase, got {prev.step} then {cur.step}")
            if cur.tokens < prev.tokens or cur.seconds < prev.seconds:
                raise ValueError(f"curve {self.name!r}: tokens and seconds must not decrease (step {cur.step})")
        for p in self.points:
            if not 0.0 <= p.acc <= 1.0:
                raise ValueError(f"curve {self.name!r}: accuracy {p.acc} at step {p.step} is outside [0, 1]")

    @property
    def start(self) -> CurvePoint:
        return self.points[0]

    @property
    def final(self) -> CurvePoint:
        return self.points[-1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "metric": self.metric,
            "points": [{"step": p.step, "tokens": p.tokens, "seconds": p.seconds, "acc": p.acc} for p in self.points],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Curve:
        try:
            points = tuple(
                CurvePoint(int(p["step"]), float(p["tokens"]), float(p["seconds"]), float(p["acc"]))
                for p in data["points"]
            )
            return cls(str(data["name"]), str(data["metric"]), points)
        except KeyError as exc:
            raise ValueError(f"curve data lacks field {exc}") from exc


def val_accuracy_key(rows: Iterable[Mapping[str, Any]]) -> str:
    """The one ``val-core/<source>/acc/mean@K`` key in a run's metrics (several sources are ambiguous)."""
    keys = sorted({k for r in rows for k in r if k.startswith("val-core/") and "/acc/mean@" in k})
    if not keys:
        raise ValueError("no 'val-core/<source>/acc/mean@K' metric found: was validation enabled (trainer.test_freq)?")
    if len(keys) > 1:
        raise ValueError(f"several held-out accuracy metrics {keys}; compare on one data source")
    return keys[0]


def _require(row: Mapping[str, Any], key: str) -> float:
    if key not in row:
        raise ValueError(f"metrics row of step {row.get('step')} lacks {key!r}")
    return float(row[key])


def curve_from_metrics(
    rows: Sequence[Mapping[str, Any]],
    name: str,
    *,
    tokens_key: str = "rollout/generated_tokens",
    step_seconds_key: str = "timing_s/step",
    testing_seconds_key: str = "timing_s/testing",
) -> Curve:
    """A trainer's metrics.jsonl rows -> its accuracy curve with cumulative tokens and training seconds.

    A training row (one with ``tokens_key``) adds its tokens and its step time
    minus its validation time; a validation row at step ``s`` is placed at the
    costs accumulated through step ``s`` (step 0: before training, zero cost).
    A step logged twice (a resumed run without truncation) is refused rather
    than counted twice.
    """
    metric = val_accuracy_key(rows)
    ordered = sorted(rows, key=lambda r: int(_require(r, "step")))
    seen_train: set[int] = set()
    seen_val: set[int] = set()
    tokens = seconds = 0.0
    points: list[CurvePoint] = []
    for row in ordered:
        step = int(row["step"])
        if tokens_key in row:
            if step in seen_train:
                raise ValueError(f"step {step} has two training rows")
            seen_train.add(step)
            tokens += _require(row, tokens_key)
            seconds += _require(row, step_seconds_key) - float(row.get(testing_seconds_key, 0.0))
        if metric in row:
            if step in seen_val:
                raise ValueError(f"step {step} has two validation rows")
            seen_val.add(step)
            points.append(CurvePoint(step, tokens, seconds, float(row[metric])))
    return Curve(name, metric, tuple(points))


def first_reaching(curve: Curve, target: float) -> CurvePoint | None:
    """The first evaluation with accuracy >= ``target``, or None if none reached it."""
    for p in curve.points:
        if p.acc >= target - _ACC_TOLERANCE:
            return p
    return None


def tokens_ratio_to_reach(ours: Curve, baseline: Curve, target: float | None = None) -> dict[str, Any]:
    """Tokens ``ours`` needed to reach ``target`` (default: the baseline's final accuracy) over the baseline's.

    Both sides use the same rule (first evaluation at or above the target), so
    a baseline that touched its final accuracy early is credited for that. The
    ratio is None, with the reason, when it would be meaningless: ours never
    got there, or the baseline needed no tokens (its target is not above where
    it started).
    """
    target = baseline.final.acc if target is None else float(target)
    mine, theirs = first_reaching(ours, target), first_reaching(baseline, target)
    out: dict[str, Any] = {
        "target_acc": target,
        "ours_point": None if mine is None else asdict(mine),
        "baseline_point": None if theirs is None else asdict(theirs),
        "ratio": None,
        "reason": "",
    }
    if theirs is None:  # only possible for an explicit target
        out["reason"] = f"{baseline.name} never reached {target:.4f}"
    elif mine is None:
        out["reason"] = f"{ours.name} never reached {target:.4f} (best {max(p.acc for p in ours.points):.4f})"
    elif theirs.tokens <= 0:
        out["reason"] = f"{baseline.name} was at {target:.4f} before training: nothing to reach"
    else:
        out["ratio"] = mine.tokens / theirs.tokens
    return out
