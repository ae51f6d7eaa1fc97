"""``python -m dapo_megatron.observability.plot RUN_DIR``: PNG dashboards from a run's metrics.jsonl.

Why PNGs from the JSONL rather than only TensorBoard: they need no server,
can be attached to an issue or a paper draft, and can be made from a run
directory copied off the cluster. One panel per question users ask of a DAPO
run: is it learning (accuracy, score), is it rambling (length, truncation),
is it collapsing (entropy, clip fractions), is dynamic sampling starving
(generation rounds per step), and where does the time go.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dapo_megatron.observability.tracking import merge_rows_by_step, read_jsonl
from dapo_megatron.reward.val_metrics import is_held_out_accuracy

# (file stem, title, [(metric key or prefix*, label)], y label)
PANELS: list[tuple[str, str, list[tuple[str, str]], str]] = [
    (
        "accuracy",
        "Accuracy and score",
        [("val-core/*", ""), ("critic/score/mean", "train score (mean)")],
        "accuracy / score",
    ),
    (
        "response_length",
        "Response length and truncation",
        [
            ("response_length/mean", "mean length"),
            ("response_length/max", "max length"),
            ("response_length/clip_ratio", "clip ratio (right axis)"),
        ],
        "tokens",
    ),
    (
        "entropy_clip",
        "Entropy and clip fractions",
        [
            ("actor/entropy", "entropy"),
            ("actor/pg_clipfrac", "pg_clipfrac"),
            ("actor/pg_clipfrac_lower", "pg_clipfrac_lower"),
        ],
        "",
    ),
    (
        "dynamic_sampling",
        "Dynamic sampling",
        [
            ("train/num_gen_batches", "generation rounds per step"),
            ("dynamic_sampling/kept_groups", "kept groups"),
            ("dynamic_sampling/filtered_groups", "filtered groups"),
        ],
        "count",
    ),
    ("timing", "Time per stage", [("timing_s/*", "")], "seconds"),
    (
        "optimizer",
        "Gradient norm and learning rate",
        [("actor/grad_norm", "grad norm"), ("actor/lr", "lr (right axis)")],
        "grad norm",
    ),
]
# Series on a second y axis: (fixed limits or None).
RIGHT_AXIS: dict[str, tuple[float, float] | None] = {"response_length/clip_ratio": (0.0, 1.0), "actor/lr": None}


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not math.isnan(v):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def _expand(rows: list[dict[str, Any]], pattern: str, label: str) -> list[tuple[str, str]]:
    if not pattern.endswith("*"):
        return [(pattern, label or pattern)]
    prefix = pattern[:-1]
    keys = sorted({k for r in rows for k in r if k.startswith(prefix)})
    if prefix == "val-core/":  # the accuracies, not verl's best@n / maj@n statistics beside them
        keys = [k for k in keys if is_held_out_accuracy(k)]
    return [(k, k[len(prefix) :]) for k in keys]


def noise_key(key: str) -> str | None:
    """The standard-error key of a held-out accuracy key (``val-aux/s/acc/sem@k``), else None."""
    if key.startswith("val-core/") and "/acc/mean@" in key:
        return "val-aux/" + key[len("val-core/") :].replace("/acc/mean@", "/acc/sem@")
    return None


def _draw_noise_band(ax, rows, key: str, xs: list[int], ys: list[float], color) -> None:
    """Shade +-2 standard errors around each held-out estimate: a rise inside it is the dice."""
    sem_key = noise_key(key)
    if sem_key is None:
        return
    sem = dict(zip(*_series(rows, sem_key), strict=True))
    if not all(x in sem for x in xs):
        return  # a run from before the noise was logged
    lo = [y - 2 * sem[x] for x, y in zip(xs, ys, strict=True)]
    hi = [y + 2 * sem[x] for x, y in zip(xs, ys, strict=True)]
    ax.fill_between(xs, lo, hi, color=color, alpha=0.2, label="±2 s.e. (sampling noise)")


def _draw_panel(ax, rows, title, specs, ylabel) -> bool:
    """Draw one panel; returns False (and says so on the panel) when it has no data."""
    drew = False
    right = None
    for pattern, label in specs:
        for key, name in _expand(rows, pattern, label):
            xs, ys = _series(rows, key)
            if not xs:
                continue
            target, style = ax, {}
            if key in RIGHT_AXIS:
                right = right or ax.twinx()
                target, style = right, {"linestyle": "--", "color": "tab:red"}
                if RIGHT_AXIS[key] is not None:
                    target.set_ylim(*RIGHT_AXIS[key])
            marker = "o" if len(xs) < 30 else None
            (line,) = target.plot(xs, ys, label=name, marker=marker, **style)
            _draw_noise_band(target, rows, key, xs, ys, line.get_color())
            drew = True
    ax.set_title(title)
    ax.set_xlabel("training step")
    if ylabel:
        ax.set_ylabel(ylabel)
    if drew:
        handles, labels = ax.get_legend_handles_labels()
        if right is not None:
            h2, l2 = right.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        ax.legend(handles, labels, fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    else:
        ax.text(0.5, 0.5, "no data in this run", ha="center", va="center", transform=ax.transAxes)
    return drew


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write one PNG per panel plus dashboard.png; returns the paths written."""
    import matplotlib  # optional: the plot extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use(): pyplot binds the backend on import

    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}: is this a run directory?")
    rows = [r for r in merge_rows_by_step(read_jsonl(metrics)) if "step" in r]
    if not rows:
        raise ValueError(f"{metrics} holds no step rows yet")
    out = Path(out_dir) if out_dir else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, title, specs, ylabel in PANELS:
        fig, ax = plt.subplots(figsize=(6, 4))
        _draw_panel(ax, rows, title, specs, ylabel)
        fig.tight_layout()
        path = out / f"{stem}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    for ax, (_, title, specs, ylabel) in zip(axes.flat, PANELS, strict=True):
        _draw_panel(ax, rows, title, specs, ylabel)
    fig.suptitle(f"DAPO run: {run_dir.name} ({len(rows)} steps)")
    fig.tight_layout()
    path = out / "dashboard.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="PNG dashboards from a run's metrics.jsonl")
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None, help="output directory (default RUN_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        paths = plot_run(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
