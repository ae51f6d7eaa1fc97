"""Where step metrics go: JSONL always, plus console, TensorBoard and W&B by config.

Why JSONL is the source of truth: it needs no service, survives a crash line
by line, and is what ``python -m dapo_megatron.observability.plot`` and the resume test read.
A resumed run first drops the lines written after the checkpoint it resumes
from, so the file never holds two different values for one step.

W&B runs offline unless ``WANDB_MODE`` says otherwise: clusters often have no
route out, and an offline run can be synced later with ``wandb sync``.
Only the logging rank (rank 0 of the data-parallel group) creates a logger.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dapo_megatron.observability import LOGGERS
from dapo_megatron.reward.val_metrics import held_out_accuracy

# Shown by the console backend, in this order, when present.
CONSOLE_KEYS = (
    ("critic/score/mean", "score", "+.3f"),
    ("val-core", "val", ".3f"),
    ("actor/pg_loss", "pg_loss", "+.4f"),
    ("actor/entropy", "entropy", ".3f"),
    ("actor/pg_clipfrac", "clipfrac", ".3f"),
    ("response_length/mean", "resp_len", ".1f"),
    ("train/num_gen_batches", "gen_rounds", ".0f"),
    ("timing_s/step", "step_s", ".1f"),
    ("timing_s/save_checkpoint", "save_s", ".1f"),
)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All rows of a metrics file; a malformed line is an error naming its number."""
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {number} is not valid JSON: {exc}") from exc
    return rows


def merge_rows_by_step(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per step, in the order steps first appear; a later row's keys join the first's.

    A step can have more than one row: the trainer writes a step's metrics before it saves
    that step's checkpoint (so a crash cannot lose the row of a checkpointed step), then
    a second row with only ``timing_s/save_checkpoint`` once the save has finished.
    Rows without a step are kept as they are.
    """
    merged: list[dict[str, Any]] = []
    by_step: dict[Any, dict[str, Any]] = {}
    for row in rows:
        if "step" not in row:
            merged.append(dict(row))
        elif row["step"] in by_step:
            by_step[row["step"]].update(row)
        else:
            by_step[row["step"]] = dict(row)
            merged.append(by_step[row["step"]])
    return merged


def truncate_jsonl_after(path: Path, step: int) -> int:
    """Drop rows with ``step`` greater than the given one; returns how many were dropped."""
    if not path.exists():
        return 0
    rows = read_jsonl(path)
    keep = [r for r in rows if r.get("step", 0) <= step]
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for r in keep:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)
    return len(rows) - len(keep)


def format_console_line(step: int, metrics: Mapping[str, float]) -> str:
    parts = [f"step {step}"]
    for key, label, fmt in CONSOLE_KEYS:
        if key == "val-core":
            acc = held_out_accuracy(metrics)
            if acc is not None:
                parts.append(f"{label} {acc:{fmt}}")
        elif key in metrics:
            parts.append(f"{label} {metrics[key]:{fmt}}")
    return " | ".join(parts)


class MetricsLogger:
    """Fans one metrics dict per step out to the configured backends."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        backends: Sequence[str] = ("console", "jsonl"),
        *,
        project: str = "dapo",
        experiment: str = "run",
        config: Mapping[str, Any] | None = None,
        resume_step: int | None = None,
    ) -> None:
        unknown = set(backends) - set(LOGGERS)
        if unknown:
            raise ValueError(f"unknown logger backend(s): {sorted(unknown)}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.backends = list(dict.fromkeys(["jsonl", *backends]))
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        if resume_step is not None:
            truncate_jsonl_after(self.jsonl_path, resume_step)
        elif self.jsonl_path.exists():
            self.jsonl_path.unlink()  # a fresh run in an old directory starts a fresh history
        self._jsonl = open(self.jsonl_path, "a")
        self._tb = None
        self._wandb_run = None
        if "tensorboard" in self.backends:
            from torch.utils.tensorboard import SummaryWriter  # optional: the logging extra

            # purge_step hides events a crashed run wrote after its last checkpoint.
            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=purge)
        if "wandb" in self.backends:
            import wandb  # optional: the logging extra

            self._wandb_run = wandb.init(
                project=project,
                name=experiment,
                dir=str(self.run_dir),
                config=dict(config or {}),
                mode=os.environ.get("WANDB_MODE", "offline"),
                resume="allow" if resume_step is not None else None,
                id=_wandb_run_id(self.run_dir),
            )

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        clean = {k: _to_float(k, v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, global_step=step)
            self._tb.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(clean, step=step)
        if "console" in self.backends:
            # tqdm.write keeps a progress bar (if one is shown) intact below the line.
            tqdm.write(format_console_line(step, clean))

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _to_float(key: str, value: Any) -> float:
    """NaN/inf pass through (they are worth seeing); non-numbers are a caller bug."""
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"metric {key!r} is not a number: {value!r}") from exc


def _wandb_run_id(run_dir: Path) -> str:
    """A stable id per run directory, so a resumed run appends to the same W&B run."""
    path = run_dir / "wandb_run_id"
    if path.exists():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id)
    return run_id
