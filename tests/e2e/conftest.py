"""A small task and a warmed-up tiny policy, built once for the end-to-end training tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e._runs import ROOT, TINY, run


@dataclass(frozen=True)
class TinyEnv:
    root: Path
    train: Path
    val: Path
    tokenizer: Path
    init_model: Path
    policy: Path  # after the supervised warm-up

    def data_overrides(self) -> list[str]:
        return [
            f"data.train_files=[{self.train}]",
            f"data.val_files=[{self.val}]",
            f"data.tokenizer_path={self.tokenizer}",
        ]


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory) -> TinyEnv:
    """Task, tokenizer and a random model; ``policy`` is not built yet (see ``tiny_env``)."""
    from dapo_megatron.data.synthetic import make_arithmetic_task
    from dapo_megatron.models.tiny import make_tiny_qwen2

    root = tmp_path_factory.mktemp("tiny_env")
    task = make_arithmetic_task(root / "task", num_train=2000, num_val=200, seed=0, digits=(1, 2))
    init_model = make_tiny_qwen2(root / "init_model", task.tokenizer_dir)
    return TinyEnv(root, task.train, task.val, task.tokenizer_dir, init_model, root / "policy")


@pytest.fixture(scope="session")
def tiny_env(tiny_task: TinyEnv) -> TinyEnv:
    """The task plus a policy warmed up with supervised steps through the Megatron actor."""
    env, root, init_model, policy = tiny_task, tiny_task.root, tiny_task.init_model, tiny_task.policy
    # One process with both threads, as the demo's warm-up: at TP=2 this tiny model spends more
    # time in gloo collectives than in compute.
    sft = [
        str(ROOT / "launch" / "sft.py"),
        "--config",
        str(TINY),
        "--init-model",
        str(init_model),
        "--out",
        str(policy),
        "--steps",
        "400",
        *env.data_overrides(),
        f"actor.model_path={init_model}",
        "actor.parallel.tensor_model_parallel_size=1",
        "trainer.n_gpus_per_node=1",
    ]
    proc = run(sft, log=root / "sft.log", timeout=900, nproc=1, threads=2)
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert (policy / "model.safetensors").exists()
    return env
