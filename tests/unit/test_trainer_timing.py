"""The checkpoint's save time is reported once, in the row of the step that saved it, and that
row is on disk before the checkpoint is committed (a crash in between redoes the step, whose
row a resume then drops: nothing lost, nothing twice).

The loop's stages are stubbed: what is under test is which rows carry what, and when.
"""

from __future__ import annotations

from types import SimpleNamespace

from dapo_megatron.config import DapoConfig
from dapo_megatron.observability.tracking import MetricsLogger, merge_rows_by_step, read_jsonl
from dapo_megatron.trainer import DapoTrainer
from tests.fakes import fake_parts

SAVE_SECONDS = 1.5


def _stubbed_trainer(tmp_path, *, total_steps: int, save_freq: int) -> DapoTrainer:
    cfg = DapoConfig()
    cfg.trainer.total_training_steps = total_steps
    cfg.trainer.checkpoint.save_freq = save_freq
    cfg.trainer.test_freq = -1
    cfg.trainer.val_before_train = False
    cfg.trainer.logger = ["jsonl"]
    trainer = DapoTrainer(cfg, fake_parts(cfg))
    trainer.step, trainer.parts.total_steps, trainer.parts.dp_size = 0, total_steps, 1
    trainer.is_logger = True
    trainer.tracker = MetricsLogger(tmp_path, ["jsonl"])
    trainer.parts.sampler = SimpleNamespace(epoch=0)
    trainer.parts.buffer = SimpleNamespace(metrics=lambda: {"train/num_gen_batches": 1.0})
    trainer._collect_batch = lambda: ([], [])
    trainer._batch_metrics = lambda groups, rounds: {"critic/score/mean": 0.0, "rollout/generated_tokens": 8.0}
    trainer._train_on = lambda groups: {}
    trainer._refresh_engine = lambda: {"weight_sync/seconds": 0.1}
    trainer._enter = lambda phase: None
    trainer.parts.lifecycle = SimpleNamespace(pop_timings=lambda: {"total": 0.0})
    trainer._pool_metrics = lambda: {}
    trainer._stop_agreed = lambda: False

    def save_checkpoint(commit=True):
        assert not commit
        trainer.timings["save_checkpoint"] += SAVE_SECONDS
        return trainer.step

    def commit_checkpoint(pending):
        assert pending == trainer.step
        rows = read_jsonl(tmp_path / "metrics.jsonl")
        assert rows[-1]["step"] == pending and "timing_s/save_checkpoint" in rows[-1]
        commits.append(pending)

    commits: list[int] = []
    trainer.commits = commits
    trainer.save_checkpoint = save_checkpoint
    trainer.commit_checkpoint = commit_checkpoint
    return trainer


def test_save_time_appears_only_in_the_step_that_saved(tmp_path):
    trainer = _stubbed_trainer(tmp_path, total_steps=5, save_freq=2)
    trainer.fit()
    trainer.tracker.close()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    saves = [(r["step"], r["timing_s/save_checkpoint"]) for r in rows if "timing_s/save_checkpoint" in r]
    assert saves == [(2, SAVE_SECONDS), (4, SAVE_SECONDS), (5, SAVE_SECONDS)]
    assert trainer.commits == [2, 4, 5]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]  # one row per step
    merged = merge_rows_by_step(rows)
    assert [r["step"] for r in merged] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in merged if "timing_s/save_checkpoint" in r] == [2, 4, 5]
    assert all("timing_s/step" in r for r in merged)
    total = sum(r.get("timing_s/save_checkpoint", 0.0) for r in merged)
    assert total == 3 * SAVE_SECONDS
