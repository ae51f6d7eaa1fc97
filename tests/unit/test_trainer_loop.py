"""The DAPO loop's own logic, run on light stand-ins for its parts (tests/fakes.py).

What the loop owns: the order of a step's phases (rollout -> train -> sync -> verify, with
the engine asleep while the actor trains), dynamic-sampling rounds until the batch fills, one
metrics row per step, a checkpoint written in TRAIN and committed only after its step's row is
logged, a pre-emption that checkpoints and stops, and a resume that continues the step count
and the data where the checkpoint left them.  The same order on the real actor and engine:
tests/e2e/test_lifecycle_order.py.
"""

from __future__ import annotations

import dataclasses
import signal

import pytest

from dapo_megatron.contract import Group
from dapo_megatron.trainer import DapoTrainer, StopRequested
from tests.fakes import FakeCheckpoints, Log, fake_parts, tiny_config
from tests.verl_names import STEP_NAMES

# one step after its rollout rounds, verification on, no offload, sleep level 1
TRAIN = [
    "engine.sleep(1)@rollout",
    "actor.compute_log_probs@train",
    "actor.update@train",
]
REFRESH = [
    "engine.wake_up(weights)@train",
    "engine.begin_weight_update@sync",
    "engine.finish_weight_update@sync",
    "engine.wake_up(kv_cache)@sync",
    "engine.engine_checksums@verify",
    "engine.generate@verify",  # the function probe: the engine samples, the actor scores
    "actor.compute_log_probs@verify",
]
# at start-up the engine is awake in ROLLOUT: the same refresh, after it sleeps for the sync
START_REFRESH = ["engine.sleep(1)@rollout", "engine.wake_up(weights)@rollout", *REFRESH[1:]]


@pytest.fixture(autouse=True)
def _no_signal_handlers(monkeypatch):
    """start() installs SIGTERM/SIGUSR1 handlers; keep pytest's."""
    monkeypatch.setattr(signal, "signal", lambda *args: None)


def _run(cfg, log=None, **parts_kw) -> DapoTrainer:
    trainer = DapoTrainer(cfg, fake_parts(cfg, log if log is not None else Log(), **parts_kw))
    trainer.start()
    trainer.fit()
    return trainer


def _steps(log: list[str]) -> list[list[str]]:
    """Start-up, then one list per step (each step opens with its first generation round)."""
    first = log.index("engine.generate@rollout")
    out = [log[:first], []]
    for event in log[first:]:
        if event == "engine.generate@rollout" and out[-1] and out[-1][-1].startswith(("tracker", "ckpt.commit")):
            out.append([])
        out[-1].append(event)
    return out


def test_a_step_is_rollout_train_sync_verify_and_saves_before_committing_after_the_row(tmp_path):
    cfg = tiny_config(tmp_path, total_steps=2, save_freq=2, test_freq=2)
    log = Log()
    trainer = _run(cfg, log, val_truths=("mixed",))
    start, step1, step2 = _steps(log)
    assert start == []  # an engine started from the checkpoint's weights needs no sync
    rounds = ["engine.generate@rollout"] * 2  # one of two prompts kept per round, two needed
    assert step1 == [*rounds, *TRAIN, *REFRESH, "tracker.log(1)@rollout"]
    assert step2 == [
        *rounds,
        *TRAIN,
        "ckpt.save(2)@train",  # the engine asleep, the actor holding what the save reads
        *REFRESH,
        "engine.generate@rollout",  # validation (test_freq), with the new weights
        "tracker.log(2)@rollout",
        "ckpt.commit(2)@rollout",  # `latest` moves once the step's row is logged
    ]
    assert [r["step"] for r in trainer.tracker.rows] == [1, 2]
    assert trainer.parts.checkpoints.committed == [2]


def test_a_row_carries_verl_s_step_names(tmp_path):
    """All but the actor's own update statistics, which the stand-in actor does not compute
    (a real run emits every one: tests/e2e/test_base_model_prompts.py)."""
    row = _run(tiny_config(tmp_path, total_steps=1)).tracker.rows[0]
    assert [name for name in STEP_NAMES if not name.startswith("actor/") and name not in row] == []


def test_dynamic_sampling_generates_rounds_until_the_batch_fills(tmp_path):
    cfg = tiny_config(tmp_path, total_steps=2)
    # in order, two prompts a round: step 1 keeps 1, 0, 0, then 2 (4 rounds); step 2 keeps 1, 1
    truths = ("mixed", "none", "none", "none", "none", "none", "mixed", "mixed", "none", "mixed", "mixed", "none")
    trainer = _run(cfg, train_truths=truths)
    rows = trainer.tracker.rows
    assert [r["train/num_gen_batches"] for r in rows] == [4.0, 2.0]
    training_rounds = [ks for n, ks in trainer.engine.calls if n == cfg.rollout.n]
    assert training_rounds == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    # each update trains on exactly train_batch_size groups of n samples
    assert trainer.parts.actor.updates == [cfg.data.train_batch_size * cfg.rollout.n] * 2
    assert trainer.parts.actor.update_count == 2


def test_one_row_per_step_and_every_save_committed_after_its_row(tmp_path):
    cfg = tiny_config(tmp_path, total_steps=5, save_freq=2)
    log = Log()
    trainer = _run(cfg, log)
    assert [r["step"] for r in trainer.tracker.rows] == [1, 2, 3, 4, 5]
    assert trainer.parts.checkpoints.committed == [2, 4, 5]  # save_freq, and the last step
    for step in (2, 4, 5):
        saved, row, committed = (
            log.index(f"{e}({step})@{p}")
            for e, p in (("ckpt.save", "train"), ("tracker.log", "rollout"), ("ckpt.commit", "rollout"))
        )
        assert saved < row < committed
    saves = [r["step"] for r in trainer.tracker.rows if "timing_s/save_checkpoint" in r]
    assert saves == [2, 4, 5]


def test_a_stop_signal_checkpoints_the_step_then_stops(tmp_path):
    cfg = tiny_config(tmp_path, total_steps=5)
    trainer = DapoTrainer(cfg, fake_parts(cfg))
    trainer.start()
    update = trainer.parts.actor.update

    def update_then_signal(batch):
        if trainer.step == 2:
            trainer._on_signal(signal.SIGTERM)
        return update(batch)

    trainer.parts.actor.update = update_then_signal
    with pytest.raises(StopRequested, match="after step 2"):
        trainer.fit()
    assert [r["step"] for r in trainer.tracker.rows] == [1, 2]
    assert trainer.parts.checkpoints.committed == [2]


def test_resume_continues_the_step_count_and_the_data(tmp_path):
    straight = _run(tiny_config(tmp_path / "a", total_steps=4))
    want = [ks for n, ks in straight.engine.calls if n == 4]

    checkpoints = FakeCheckpoints(Log())
    first = _run(tiny_config(tmp_path / "b", total_steps=2, save_freq=2), checkpoints=checkpoints)
    log = Log()
    checkpoints.log = log
    resumed = _run(
        tiny_config(tmp_path / "b", total_steps=4), log, checkpoints=checkpoints, resume_from=checkpoints.latest()
    )
    assert resumed.tracker.resume_step == 2
    assert [r["step"] for r in resumed.tracker.rows] == [3, 4]
    assert resumed.parts.actor.update_count == 4  # restored 2, then two updates
    got = [ks for n, ks in first.engine.calls + resumed.engine.calls if n == 4]
    assert got == want  # the sampler continues where the checkpoint left it
    start = _steps(log)[0]
    # the engine holds the checkpoint's weights, not the resumed actor's: synced before any use
    assert start == ["ckpt.load(step_2)@-", *START_REFRESH]


@pytest.mark.parametrize(
    ("setting", "carried_response", "trained_on"),
    [(None, [7] * 3, 1), ("rollout.n", [7] * 3, 0), ("data.max_response_length", [7] * 6, 0)],
    ids=["unchanged", "fewer-samples", "shorter-cap"],
)
def test_a_resume_with_changed_settings_drops_carried_groups_it_cannot_train(
    tmp_path, setting, carried_response, trained_on
):
    """A carried group of the old rollout.n cannot share a batch with the new groups, and a
    response over the new cap does not fit the actor batch: both would fail mid-step. A group
    that still fits is trained on."""
    cfg = tiny_config(tmp_path, total_steps=2, save_freq=2)
    cfg.algorithm.filter_groups.max_carry_age = 2
    checkpoints = FakeCheckpoints(Log())
    _run(cfg, checkpoints=checkpoints)
    carried = Group(
        uid="carried",
        prompt_ids=[1, 2],
        response_ids=[carried_response] * 4,
        rollout_log_probs=[[-1.0] * len(carried_response)] * 4,
        truncated=[False] * 4,
        acc=[0.0, 1.0, 0.0, 1.0],
        score=[-1.0, 1.0, -1.0, 1.0],
        seq_reward=[-1.0, 1.0, -1.0, 1.0],
        born_step=2,
    )
    checkpoints.saved[2]["buffer"]["groups"].insert(0, dataclasses.asdict(carried))
    resumed_cfg = tiny_config(tmp_path, total_steps=3)
    resumed_cfg.algorithm.filter_groups.max_carry_age = 2
    if setting == "rollout.n":
        resumed_cfg.rollout.n = 2
    elif setting == "data.max_response_length":
        resumed_cfg.data.max_response_length = 4
        resumed_cfg.algorithm.overlong_buffer.len = 2
    resumed = _run(resumed_cfg, checkpoints=checkpoints, resume_from=checkpoints.latest())
    rows = resumed.tracker.rows
    assert [r["step"] for r in rows] == [3]
    assert rows[0]["dynamic_sampling/carried_in_groups"] == trained_on


def test_verify_freq_verifies_the_startup_sync_every_nth_step_and_the_last(tmp_path):
    cfg = tiny_config(tmp_path, total_steps=5)
    cfg.rollout.weight_sync.verify_freq = 2
    log = Log()
    trainer = _run(cfg, log, load_format="dummy")
    start, *steps = _steps(log)
    assert "engine.engine_checksums@verify" in start
    verified = [i for i, events in enumerate(steps, 1) if "engine.engine_checksums@verify" in events]
    assert verified == [2, 4, 5]
    rows = trainer.tracker.rows
    assert [r["step"] for r in rows if r["weight_sync/verified_tensors"] > 0] == [2, 4, 5]
    assert [r["step"] for r in rows if "timing_s/verify_weights" in r] == [2, 4, 5]


def test_a_dummy_started_engine_is_synced_before_first_use(tmp_path):
    cfg = tiny_config(tmp_path, total_steps=1)
    log = Log()
    _run(cfg, log, load_format="dummy")
    assert _steps(log)[0] == START_REFRESH


def test_validation_before_training_is_its_own_row(tmp_path):
    cfg = tiny_config(tmp_path, total_steps=1, val_before_train=True)
    trainer = _run(cfg, val_truths=("mixed", "none"))
    rows = trainer.tracker.rows
    assert [r["step"] for r in rows] == [0, 1]
    assert any(k.startswith("val-") for k in rows[0]) and "timing_s/testing" in rows[0]
    assert not any(k.startswith("val-") for k in rows[1])
