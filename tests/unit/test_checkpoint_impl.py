"""A checkpoint records the layer implementation that wrote it; the other one is refused by name."""

from __future__ import annotations

import json

import pytest

from dapo_megatron.checkpoint.layout import META_FILE
from dapo_megatron.checkpoint.metadata import CheckpointMismatchError, check_transformer_impl, write_checkpoint_metadata
from dapo_megatron.conversion.mcore_to_hf import mcore_to_hf
from dapo_megatron.conversion.validation import ConversionError
from tests.tiny_models import metadata_config


def test_metadata_records_the_impl(tmp_path):
    write_checkpoint_metadata(
        tmp_path,
        metadata_config(),
        step=1,
        tp=1,
        pp=1,
        has_optimizer=False,
        has_extra_state=False,
        transformer_impl="transformer_engine",
    )
    assert json.loads((tmp_path / META_FILE).read_text())["transformer_impl"] == "transformer_engine"


def test_the_other_impl_is_refused_by_name():
    check_transformer_impl({"transformer_impl": "local"}, "local")
    check_transformer_impl({}, "local")  # written before the field existed: by CPU runs, local
    with pytest.raises(CheckpointMismatchError, match=r"written by a local model and this one is transformer_engine"):
        check_transformer_impl({}, "transformer_engine")
    with pytest.raises(CheckpointMismatchError, match=r"set actor\.transformer_impl=transformer_engine"):
        check_transformer_impl({"transformer_impl": "transformer_engine"}, "local")


def test_export_refuses_a_te_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "metadata.json").write_text("{}")
    write_checkpoint_metadata(
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
