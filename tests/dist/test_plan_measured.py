"""The planner's per-rank actor state (weights, fp32 grads, sharded Adam) against the real actor."""

from __future__ import annotations

import json

import pytest

from dapo_megatron.planning.memory import actor_stage_params, actor_state_bytes, model_shape_from_hf
from tests.dist._launch import run_torchrun
from tests.tiny_models import tiny_config

# The worker's model (workers/plan_measure_worker.py), read as the planner reads a config.json.
SHAPE = model_shape_from_hf(tiny_config(num_hidden_layers=4, tie_word_embeddings=False))


@pytest.mark.dist
@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2)])
def test_planner_actor_state_matches_the_built_actor(tmp_path, tp, pp):
    out = tmp_path / "measured.json"
    run_torchrun("plan_measure_worker.py", [tp, pp, out], nproc=2, timeout=300)
    for row in json.loads(out.read_text()):
        params = actor_stage_params(SHAPE, tp, pp, row["stage"])
        assert row["params"] == params, row  # exact: the formula counts every parameter
        est = actor_state_bytes(params, "float32", row["dp"], distributed_optimizer=True)
        # DDP pads its grad buffer (and so the optimizer shards) for bucket alignment.
        assert est.grads <= row["grad_bytes"] <= est.grads * 1.10 + 4096, (row, est)
        assert est.optimizer * 0.9 - 4096 <= row["optimizer_bytes"] <= est.optimizer * 1.10 + 4096, (row, est)
