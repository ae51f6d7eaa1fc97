"""Checkpoint manifests, verification, the resume=auto fallback and the resume config diff,
on real files in one process (no process group: one process reads every file)."""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path

import pytest

from dapo_megatron.checkpoint import manifest as mf
from dapo_megatron.checkpoint.agreement import CheckpointSaveError, agree_on_failure
from dapo_megatron.checkpoint.layout import LATEST_FILE, META_FILE, RANK_STATE_DIR, complete_checkpoints, step_dir_name
from dapo_megatron.checkpoint.metadata import write_checkpoint_metadata
from dapo_megatron.checkpoint.verify import UNVERIFIED, CheckpointIntegrityError, verify_checkpoint
from dapo_megatron.config import DapoConfig, to_dict
from dapo_megatron.resume import choose_checkpoint, diff_configs, log_config_diff
from tests.tiny_models import metadata_config

SHARD = "__1_0.distcp"


def _checkpoint(root: Path, step: int, *, manifest: bool = True) -> Path:
    """A step directory of real files laid out as save_checkpoint lays them out (no tensors)."""
    d = root / step_dir_name(step)
    (d / RANK_STATE_DIR).mkdir(parents=True)
    (d / "__0_0.distcp").write_bytes(bytes(range(256)) * 40)
    (d / SHARD).write_bytes(b"\x01" * 10_000 + bytes([step]))
    (d / RANK_STATE_DIR / "rank_00000.pt").write_bytes(b"rank state")
    write_checkpoint_metadata(
        d, metadata_config(), step=step, tp=1, pp=1, has_optimizer=True, has_extra_state=False, manifest=manifest
    )
    if manifest:
        mf.write_manifest(d, mf.build_manifest(d))
    (root / LATEST_FILE).write_text(d.name + "\n")
    return d


def _flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_manifest_lists_every_file_with_size_and_crc32(tmp_path):
    d = _checkpoint(tmp_path, 1)
    manifest = mf.read_manifest(d)
    names = [f.path for f in manifest.files]
    assert names == ["__0_0.distcp", SHARD, META_FILE, "rank_state/rank_00000.pt"]
    shard = next(f for f in manifest.files if f.path == SHARD)
    assert shard.size == 10_001 and shard.crc32 == zlib.crc32((d / SHARD).read_bytes())
    assert json.loads((d / mf.MANIFEST_FILE).read_text())["checksum"] == "crc32"
    assert json.loads((d / META_FILE).read_text())["manifest"] is True
    v = verify_checkpoint(d, checksums=True)
    assert v.intact and v.verified and v.checked == "sizes and crc32" and v.total_bytes == manifest.total_bytes


def test_crc32_file_reads_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(mf, "_CHUNK", 7)
    p = tmp_path / "f"
    p.write_bytes(bytes(range(200)) * 3)
    assert mf.crc32_file(p) == zlib.crc32(p.read_bytes())


def test_truncated_shard_names_checkpoint_file_and_both_sizes(tmp_path):
    d = _checkpoint(tmp_path, 1)
    with open(d / SHARD, "r+b") as f:
        f.truncate(1000)
    v = verify_checkpoint(d, checksums=False)
    assert not v.intact
    assert str(v.error()) == (
        f"checkpoint {d} is damaged (sizes checked against its manifest.json): "
        f"{SHARD}: expected 10001 bytes, found 1000 bytes"
    )


def test_flipped_byte_is_found_by_checksums_only(tmp_path):
    d = _checkpoint(tmp_path, 1)
    before = zlib.crc32((d / SHARD).read_bytes())
    _flip_byte(d / SHARD)
    after = zlib.crc32((d / SHARD).read_bytes())
    assert verify_checkpoint(d, checksums=False).intact  # same size
    v = verify_checkpoint(d, checksums=True)
    assert str(v.error()).endswith(f"{SHARD}: expected crc32 {before:#010x}, found crc32 {after:#010x}")


def test_missing_file_and_missing_manifest(tmp_path):
    d = _checkpoint(tmp_path, 1)
    (d / RANK_STATE_DIR / "rank_00000.pt").unlink()
    v = verify_checkpoint(d, checksums=True)
    assert [str(p) for p in v.problems] == ["rank_state/rank_00000.pt: expected 10 bytes, found no such file"]
    (d / mf.MANIFEST_FILE).unlink()  # dapo_checkpoint.json says there is one: damaged, not legacy
    v = verify_checkpoint(d, checksums=True)
    assert not v.intact and "manifest.json: expected the manifest that dapo_checkpoint.json records" in v.reason()


def test_checkpoint_without_manifest_is_accepted_unverified(tmp_path):
    d = _checkpoint(tmp_path, 1, manifest=False)
    v = verify_checkpoint(d, checksums=True)
    assert v.intact and not v.verified and v.checked == UNVERIFIED


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("{not json", r"manifest\.json: not valid JSON"),
        ('{"checksum": "md5", "files": []}', r"field 'checksum' is 'md5', expected 'crc32'"),
        ('{"checksum": "crc32", "files": {}}', r"field 'files' must be a list, got dict"),
        ('{"checksum": "crc32", "files": [{"path": "a", "size": -1, "crc32": 0}]}', r"files\[0\] must have"),
    ],
)
def test_malformed_manifest_names_file_and_field(tmp_path, body, message):
    d = _checkpoint(tmp_path, 1)
    (d / mf.MANIFEST_FILE).write_text(body)
    with pytest.raises(mf.ManifestError, match=message):
        mf.read_manifest(d)
    v = verify_checkpoint(d, checksums=False)
    assert not v.intact and v.problems[0].path == mf.MANIFEST_FILE


def test_auto_skips_damaged_newest_sets_it_aside_and_warns(tmp_path, caplog):
    good = _checkpoint(tmp_path, 2)
    bad = _checkpoint(tmp_path, 4)
    with open(bad / SHARD, "r+b") as f:
        f.truncate(10)
    with caplog.at_level(logging.WARNING):
        choice = choose_checkpoint("auto", tmp_path, checksums=True)
    assert choice.directory == good
    assert [(s.directory, s.moved_to) for s in choice.skipped] == [(bad, tmp_path / "damaged-step_00000004")]
    assert (tmp_path / "damaged-step_00000004" / SHARD).stat().st_size == 10  # kept, not deleted
    assert good.is_dir() and (tmp_path / "latest").read_text().strip() == good.name
    assert complete_checkpoints(tmp_path) == [good]
    warning = caplog.text
    assert f"CHECKPOINT SKIPPED: {bad} is damaged ({SHARD}: expected 10001 bytes, found 10 bytes)" in warning
    assert "renamed to damaged-step_00000004; resume=auto falls back to step_00000002" in warning


def test_named_damaged_checkpoint_is_refused_and_left_alone(tmp_path):
    _checkpoint(tmp_path, 2)
    bad = _checkpoint(tmp_path, 4)
    _flip_byte(bad / SHARD)
    with pytest.raises(CheckpointIntegrityError, match=rf"checkpoint {bad} is damaged .*{SHARD}: expected crc32"):
        choose_checkpoint(str(bad), tmp_path, checksums=True)
    assert bad.is_dir() and (tmp_path / "latest").read_text().strip() == bad.name
    assert choose_checkpoint(str(bad), tmp_path, checksums=False).directory == bad  # sizes only: same size


def test_auto_refuses_when_every_checkpoint_is_damaged(tmp_path):
    for step in (2, 4):
        (_checkpoint(tmp_path, step) / SHARD).unlink()
    with pytest.raises(CheckpointIntegrityError, match=r"every checkpoint under .* is damaged") as e:
        choose_checkpoint("auto", tmp_path, checksums=False)
    assert "step_00000002" in str(e.value) and "step_00000004" in str(e.value)
    assert len(complete_checkpoints(tmp_path)) == 2  # nothing renamed


def test_auto_without_checkpoints_and_disable(tmp_path):
    assert choose_checkpoint("auto", tmp_path / "none", checksums=True).directory is None
    _checkpoint(tmp_path, 1)
    assert choose_checkpoint("disable", tmp_path, checksums=True).directory is None


def test_legacy_checkpoint_is_resumed_with_a_warning(tmp_path, caplog):
    d = _checkpoint(tmp_path, 3, manifest=False)
    with caplog.at_level(logging.WARNING):
        assert choose_checkpoint("auto", tmp_path, checksums=True).directory == d
    assert "has no manifest (written by an earlier version): resuming from it unverified" in caplog.text


def test_config_diff_warns_on_data_batch_and_group_size_only(caplog):
    saved = to_dict(DapoConfig())
    new = DapoConfig()
    new.data.train_files = ["b.parquet"]
    new.data.train_batch_size = 4
    new.rollout.n = 8
    new.actor.optim.lr = 3e-6
    new.trainer.total_training_steps = 500
    new.trainer.logger = ["jsonl"]
    diff = diff_configs(saved, to_dict(new))
    assert [str(c) for c in diff.warned] == [
        "data.train_batch_size: 8 -> 4",
        "data.train_files: [] -> ['b.parquet']",
        "rollout.n: 16 -> 8",
    ]
    assert [c.key for c in diff.free] == ["actor.optim.lr", "trainer.logger", "trainer.total_training_steps"]
    with caplog.at_level(logging.INFO):
        log_config_diff(saved, to_dict(new), Path("/ckpt/step_00000004"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "rollout.n: 16 -> 8" in warnings[0] and "lr" not in warnings[0]
    assert diff_configs(saved, saved) == diff_configs(saved, to_dict(DapoConfig()))
    assert not diff_configs(saved, saved).warned and not diff_configs(saved, saved).free


def test_failed_save_message_names_path_free_space_and_latest(tmp_path):
    """One process: the agreement step of a failed save (the multi-rank case runs in tests/dist)."""
    import errno
    import os

    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.utils import _wrap_exception

    _checkpoint(tmp_path, 2)
    tmp = tmp_path / "tmp-step_00000003"
    (tmp / "sub").mkdir(parents=True)
    (tmp / "sub" / "partial").write_bytes(b"x" * 100)
    try:
        raise RuntimeError("Worker failure") from OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except RuntimeError as exc:
        wrapped = CheckpointException("write", {0: _wrap_exception(exc)})  # as megatron raises it
    with pytest.raises(CheckpointSaveError) as e:
        agree_on_failure(wrapped, root=tmp_path, tmp=tmp, final=tmp_path / "step_00000003")
    msg = str(e.value)
    assert msg.startswith(
        f"saving checkpoint step_00000003 into {tmp} failed (rank 0: [Errno 28] No space left on device); "
    )
    assert f"free on the file system of {tmp_path} when it failed; `latest` still names step_00000002" in msg
    assert msg.endswith(f"the partial {tmp} was removed") and not tmp.exists()
    assert agree_on_failure(None, root=tmp_path, tmp=tmp, final=tmp_path / "step_00000003") is None
    with pytest.raises(CheckpointSaveError, match=r"failed \(rank 0: ValueError: x\)"):
        agree_on_failure(ValueError("x"), root=tmp_path, tmp=tmp, final=tmp_path / "step_00000003")
