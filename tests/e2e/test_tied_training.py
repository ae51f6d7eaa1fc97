"""The trainer with a tied-embedding model, the common case for small models (the demo model is untied).

A random tied tiny Qwen2 cannot solve the task, so groups differ only by the overlong shaping of
their lengths: filtering on ``seq_reward`` keeps those groups and the weights move every step
(lr 1e-3, no warm-up).  Checked through ``launch/train.py``:

* healthy: the fresh-sample rollout/actor gap and the post-sync function probe stay at the fp32
  level every step, and vLLM never says it failed to load the LM head;
* the engine's LM head made stale on purpose (``rollout.weight_sync.inject_stale_tensors``):
  with verification off, the mismatch guard sees the gap, re-verifies, and stops naming the
  tensor; with verification on, the first verification after an update stops it.
"""

from __future__ import annotations

import re

import pytest

from tests.e2e._runs import metric_rows, run, train_args

HEALTHY = 1e-5  # fp32 engine and actor on CPU: ~1e-7..1e-6 per token


@pytest.fixture(scope="module")
def tied_model(tiny_task):
    from dapo_megatron.models.tiny import make_tiny_qwen2

    return make_tiny_qwen2(tiny_task.root / "tied_model", tiny_task.tokenizer, tie_word_embeddings=True)


def _args(tiny_task, tied_model, out, *overrides):
    return train_args(
        out,
        *tiny_task.data_overrides(),
        f"actor.model_path={tied_model}",
        "algorithm.filter_groups.metric=seq_reward",
        "actor.optim.lr=1e-3",
        "actor.optim.lr_warmup_steps=0",
        "trainer.test_freq=-1",
        "trainer.val_before_train=false",
        "trainer.checkpoint.save_freq=-1",
        "rollout.weight_sync.verify_freq=1",  # tiny_cpu.yaml verifies every 25th step
        *overrides,
    )


def test_tied_model_trains_on_policy(tiny_task, tied_model, tmp_path):
    out = tmp_path / "out"
    log = tmp_path / "run.log"
    proc = run(_args(tiny_task, tied_model, out, "trainer.total_training_steps=5"), log=log)
    assert proc.returncode == 0, proc.stdout[-5000:]
    rows = metric_rows(out)
    assert sorted(rows) == [1, 2, 3, 4, 5], sorted(rows)
    for step, r in rows.items():
        assert r["rollout/actor_mismatch_mean_abs_diff"] <= HEALTHY, (step, r)
        assert r["weight_sync/probe_mean_abs_diff"] <= HEALTHY, (step, r)
        assert r["weight_sync/verified_tensors"] > 0 and r["rollout/mismatch_breaches"] == 0
        assert r["actor/grad_norm"] > 0
    assert "ParallelLMHead: Failed to load weights" not in proc.stdout
    # the policy moved: the last step's samples are scored differently from the first's
    assert rows[5]["actor/entropy"] != rows[1]["actor/entropy"]


def test_guard_stops_a_run_whose_lm_head_went_stale(tiny_task, tied_model, tmp_path):
    out = tmp_path / "out"
    drill = "rollout.weight_sync.inject_stale_tensors=[lm_head.weight]"
    args = _args(
        tiny_task, tied_model, out, drill, "rollout.weight_sync.verify=false", "trainer.total_training_steps=6"
    )
    proc = run(args, log=tmp_path / "run.log")
    assert proc.returncode != 0, proc.stdout[-5000:]
    assert re.search(r"differ from the actor's by \S+ per token .* above rollout.max_mismatch=1\.0e-04", proc.stdout)
    assert "weight verification failed" in proc.stdout and "lm_head.weight" in proc.stdout, proc.stdout[-5000:]
    rows = metric_rows(out)
    assert rows and all(r["rollout/mismatch_breaches"] == 0 for r in rows.values()), rows
    assert len(rows) < 6


def test_verification_stops_a_run_whose_lm_head_went_stale(tiny_task, tied_model, tmp_path):
    out = tmp_path / "out"
    drill = "rollout.weight_sync.inject_stale_tensors=[lm_head.weight]"
    proc = run(_args(tiny_task, tied_model, out, drill, "trainer.total_training_steps=3"), log=tmp_path / "run.log")
    assert proc.returncode != 0, proc.stdout[-5000:]
    assert "weight verification failed" in proc.stdout and "lm_head.weight" in proc.stdout, proc.stdout[-5000:]
    # step 1's sync recorded the head the drill then keeps; step 2's verification finds it stale
    assert sorted(metric_rows(out)) == [1]
