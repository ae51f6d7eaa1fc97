"""Metrics go to every configured backend, and a resumed run never holds a step twice."""

import json
import math

import pytest

from dapo_megatron.observability.tracking import (
    MetricsLogger,
    format_console_line,
    merge_rows_by_step,
    read_jsonl,
    truncate_jsonl_after,
)


def test_jsonl_rows_and_console_line(tmp_path, capsys):
    with MetricsLogger(tmp_path, ["console", "jsonl"]) as log:
        log.log({"critic/score/mean": 0.25, "actor/pg_loss": -0.01, "val-core/arith/acc/mean@4": 0.5}, step=1)
        log.log({"critic/score/mean": float("nan")}, step=2)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert rows[0] == {"step": 1, "critic/score/mean": 0.25, "actor/pg_loss": -0.01, "val-core/arith/acc/mean@4": 0.5}
    assert rows[1]["step"] == 2 and math.isnan(rows[1]["critic/score/mean"])
    out = capsys.readouterr().out
    assert "step 1 | score +0.250 | val 0.500 | pg_loss -0.0100" in out


def test_resume_drops_rows_written_after_the_checkpoint(tmp_path):
    with MetricsLogger(tmp_path, ["jsonl"]) as log:
        for step in range(1, 6):
            log.log({"x": step}, step=step)
    # Crash after step 5, last checkpoint at step 3: steps 4 and 5 are redone.
    with MetricsLogger(tmp_path, ["jsonl"], resume_step=3) as log:
        log.log({"x": 40}, step=4)
    assert [(r["step"], r["x"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == [(1, 1), (2, 2), (3, 3), (4, 40)]
    # A fresh (not resumed) run in the same directory starts a fresh history.
    with MetricsLogger(tmp_path, ["jsonl"]) as log:
        log.log({"x": 7}, step=1)
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "x": 7}]


def test_truncate_missing_file_and_bad_lines(tmp_path):
    assert truncate_jsonl_after(tmp_path / "none.jsonl", 3) == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"step": 1}) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2 is not valid JSON"):
        read_jsonl(bad)


def test_bad_metric_and_backend_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown logger backend"):
        MetricsLogger(tmp_path, ["mlflow"])
    with MetricsLogger(tmp_path, ["jsonl"]) as log:
        with pytest.raises(TypeError, match="metric 'actor/lr' is not a number"):
            log.log({"actor/lr": "fast"}, step=1)


def test_tensorboard_events_are_readable_and_purged_on_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, ["tensorboard"]) as log:
        for step in range(1, 4):
            log.log({"actor/entropy": 1.0 / step}, step=step)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("actor/entropy")] == [1, 2, 3]
    assert acc.Scalars("actor/entropy")[2].value == pytest.approx(1 / 3)


def test_wandb_offline_run_without_network(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    with MetricsLogger(tmp_path, ["wandb"], project="p", experiment="e", config={"lr": 1e-6}) as log:
        log.log({"actor/lr": 1e-6}, step=1)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    assert (tmp_path / "wandb_run_id").read_text().strip() in runs[0].name


def test_console_line_skips_missing_keys():
    assert format_console_line(3, {}) == "step 3"


def test_rows_of_one_step_merge_in_order():
    rows = [
        {"step": 0, "val": 0.2},
        {"step": 1, "a": 1.0},
        {"step": 1, "timing_s/save_checkpoint": 3.0},
        {"note": "no step"},
        {"step": 2, "a": 2.0},
    ]
    assert merge_rows_by_step(rows) == [
        {"step": 0, "val": 0.2},
        {"step": 1, "a": 1.0, "timing_s/save_checkpoint": 3.0},
        {"note": "no step"},
        {"step": 2, "a": 2.0},
    ]
