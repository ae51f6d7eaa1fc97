"""A base model's prompt set: plain-text prompts and a tokenizer without a chat template train end to end."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

from dapo_megatron.data.synthetic import DATA_SOURCE
from tests.e2e._runs import metric_rows, run, train_args
from tests.verl_names import ROLLOUT_CORR_NAMES, STEP_NAMES, val_names

pytestmark = pytest.mark.e2e


def _plain_text_copy(src, dst):
    """The task's rows with the prompt column as one string each, as a base-model data set stores it."""
    table = pq.read_table(src)
    texts = ["\n".join(m["content"] for m in messages) for messages in table.column("prompt").to_pylist()]
    index = table.column_names.index("prompt")
    pq.write_table(table.set_column(index, "prompt", [texts]), dst)
    return dst


def _tokenizer_without_template(src, dst):
    shutil.copytree(src, dst)
    config = dst / "tokenizer_config.json"
    data = json.loads(config.read_text())
    data.pop("chat_template", None)
    config.write_text(json.dumps(data))
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    return dst


def test_plain_text_prompts_without_chat_template_train(tiny_task, tmp_path):
    from transformers import AutoTokenizer

    tok = _tokenizer_without_template(tiny_task.tokenizer, tmp_path / "base_tokenizer")
    assert not AutoTokenizer.from_pretrained(tok).chat_template
    train = _plain_text_copy(tiny_task.train, tmp_path / "train_plain.parquet")
    val = _plain_text_copy(tiny_task.val, tmp_path / "val_plain.parquet")
    out = tmp_path / "out"
    args = train_args(
        out,
        f"data.train_files=[{train}]",
        f"data.val_files=[{val}]",
        "data.val_max_samples=4",
        "rollout.val.n=2",
        f"data.tokenizer_path={tok}",
        "data.apply_chat_template=false",
        f"actor.model_path={tiny_task.init_model}",
        # a random policy: every group would be filtered, and this test is about the prompts
        "algorithm.filter_groups.enable=false",
        "trainer.total_training_steps=1",
        # one small validation and truncated IS on: their verl metric names are checked too
        "trainer.val_before_train=true",
        "algorithm.rollout_is.enable=true",
        "trainer.test_freq=-1",
        "trainer.checkpoint.save_freq=-1",
    )
    proc = run(args, log=tmp_path / "run.log")
    assert proc.returncode == 0, proc.stdout[-5000:]
    rows = metric_rows(out)
    row = rows[1]
    assert row["dynamic_sampling/kept_groups"] >= 8
    # the run emits verl's step metric names (tests/verl_names.py; definitions: tests/unit/test_verl_metrics.py)
    assert [name for name in STEP_NAMES if name not in row] == []
    assert row["training/global_step"] == 1
    # and, over both ranks, the rollout-correction names (tests/unit/test_rollout_correction.py);
    # before training, the validation names (tests/unit/test_verl_val_metrics.py)
    assert [name for name in ROLLOUT_CORR_NAMES if name not in row] == []
    assert [name for name in val_names(DATA_SOURCE, 2) if name not in rows[0]] == []
