"""A checkpoint records the layer implementation that wrote it; the other one is refused by name."""

from __future__ import annotations

import json

import pytest

from dapo_megatron.actor import checkpoint as ck
from dapo_megatron.convert import mcore_to_hf
from dapo_megatron.convert_validation import ConversionError
from tests.tiny_models import metadata_config


def test_metadata_records_the_impl(tmp_path):
    ck.write_checkpoint_metadata(
        tmp_path,
        metadata_config(),
        step=1,
        tp=1,
        pp=1,
        has_optimizer=False,
        has_extra_state=False,
        transformer_impl="transformer_engine",
    )
    assert json.loads((tmp_path / ck.META_FILE).read_text())["transformer_impl"] == "transformer_engine"


def test_the_other_impl_is_refused_by_name():
    ck.check_transformer_impl({"transformer_impl": "local"}, "local")
    ck.check_transformer_impl({}, "local")  # written before the field existed: by CPU runs, local
    with pytest.raises(
        ck.CheckpointMismatchError, match=r"written by a local model and this one is transformer_engine"
    ):
        ck.check_transformer_impl({}, "transformer_engine")
    with pytest.raises(ck.CheckpointMismatchError, match=r"set actor\.transformer_impl=transformer_engine"):
        ck.check_transformer_impl({"transformer_impl": "transformer_engine"}, "local")


def test_export_refuses_a_te_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "metadata.json").write_text("{}")
    ck.write_checkpoint_metadata(
        ckpt,
        metadata_config(),
        step=1,
        tp=1,
        pp=1,
        has_optimizer=False,
        has_extra_state=False,
        transformer_impl="transformer_engine",
    )
    with pytest.raises(ConversionError, match="written by a transformer_engine model"):
        mcore_to_hf(ckpt, tmp_path / "out", progress=False)
