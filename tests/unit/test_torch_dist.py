"""Streaming torch_dist writer and region reader (real torch DCP files, no process group)."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch

from dapo_megatron.checkpoint.torch_dist import (
    ChunkSpec,
    Region,
    TorchDistReader,
    common_state_in_dcp,
    write_torch_dist,
)

LAYERS = 3


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "decoder.layers.w": torch.randn(LAYERS, 6, 4, generator=g),
        "embedding.weight": torch.randn(10, 4, generator=g).to(torch.bfloat16),
        "final.weight": torch.randn(4, generator=g),
    }


def _chunks(full: dict[str, torch.Tensor], alive: list | None = None, fail_at: str | None = None):
    """One chunk per layer of the stacked tensor, one for the flat one; producers clone on demand."""

    def producer(key, index, label):
        def produce():
            if label == fail_at:
                raise ValueError(f"cannot convert {label}")
            if alive is not None:  # streaming: only the chunk written last may still be referenced
                gc.collect()  # (torch's writer loop variable holds it until the next one arrives)
                assert all(ref() is None for ref in alive[:-1]), f"{label}: earlier chunks are still in memory"
            t = full[key][index].clone()
            if alive is not None:  # the storage: the writer holds detached aliases, not our tensor object
                alive.append(weakref.ref(t.untyped_storage()))
            return t

        return produce

    w = full["decoder.layers.w"]
    out = [
        (
            ChunkSpec("decoder.layers.w", tuple(w.shape), (i, 0, 0), (1, 6, 4), w.dtype, label=f"layer {i}"),
            producer("decoder.layers.w", slice(i, i + 1), f"layer {i}"),
        )
        for i in range(LAYERS)
    ]
    e = full["embedding.weight"]
    spec = ChunkSpec("embedding.weight", (10, 4), (0, 0), (10, 4), e.dtype, label="emb")
    out.append((spec, producer("embedding.weight", slice(None), "emb")))
    spec = ChunkSpec("final.weight", (4,), (0,), (4,), torch.float32, label="final")
    out.append((spec, producer("final.weight", slice(None), "final")))
    return out


def test_written_checkpoint_reads_back_any_region_one_chunk_in_memory(tmp_path):
    full = _tensors()
    alive: list = []
    seen: list[str] = []
    write_torch_dist(
        tmp_path,
        _chunks(full, alive),
        {"decoder.layers.x._extra_state/shard_0_3": None},
        {"note": 1},
        on_chunk=lambda spec: seen.append(spec.label),
    )
    assert seen == ["layer 0", "layer 1", "layer 2", "emb", "final"]
    assert json.loads((tmp_path / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    assert (tmp_path / "common.pt").is_file() != common_state_in_dcp()

    reader = TorchDistReader(tmp_path)
    assert {k: tuple(v.size) for k, v in reader.tensors.items()} == {
        "decoder.layers.w": (LAYERS, 6, 4),
        "embedding.weight": (10, 4),
        "final.weight": (4,),
    }
    # regions across chunk borders and inside one chunk, two tensors in one load
    across, inside, emb = reader.read(
        [
            Region("decoder.layers.w", (1, 2, 0), (2, 3, 4)),
            Region("decoder.layers.w", (0, 0, 1), (1, 6, 2)),
            Region("embedding.weight", (3, 0), (5, 4)),
        ]
    )
    assert torch.equal(across, full["decoder.layers.w"][1:3, 2:5])
    assert torch.equal(inside, full["decoder.layers.w"][0:1, :, 1:3])
    assert emb.dtype == torch.bfloat16 and torch.equal(emb, full["embedding.weight"][3:8])


def test_reader_errors_name_the_tensor(tmp_path):
    write_torch_dist(tmp_path, _chunks(_tensors()), {}, {})
    reader = TorchDistReader(tmp_path)
    with pytest.raises(KeyError, match="no tensor 'missing'"):
        reader.read([Region("missing", (0,), (1,))])
    with pytest.raises(ValueError, match=r"leaves decoder.layers.w \(3, 6, 4\)"):
        reader.read([Region("decoder.layers.w", (2, 0, 0), (2, 6, 4))])
    with pytest.raises(FileNotFoundError, match="no .metadata"):
        TorchDistReader(tmp_path / "nowhere")


def test_writer_errors_are_the_producers_own(tmp_path):
    with pytest.raises(ValueError, match="cannot convert layer 1"):
        write_torch_dist(tmp_path / "a", _chunks(_tensors(), fail_at="layer 1"), {}, {})
    assert not (tmp_path / "a" / "metadata.json").exists()  # never marked complete

    full = _tensors()
    bad = _chunks(full)
    spec, _ = bad[0]
    bad[0] = (spec, lambda: torch.zeros(1, 6, 5))
    with pytest.raises(ValueError, match=r"layer 0: produced \(1, 6, 5\)"):
        write_torch_dist(tmp_path / "b", bad, {}, {})

    gap = _chunks(full)[1:]  # layer 0 missing: refused before any data is written
    with pytest.raises(ValueError, match=r"decoder.layers.w: chunks hold 48 of the 72 elements"):
        write_torch_dist(tmp_path / "c", gap, {}, {})
    overlap = _chunks(full)  # layer 0 as rows 0-2 and 2-4: the right volume, but overlapping
    spec, _ = overlap[0]
    overlap[0:1] = [
        (ChunkSpec(spec.key, spec.global_shape, (0, row, 0), (1, 3, 4), spec.dtype, f"rows {row}"), lambda: None)
        for row in (0, 2)
    ]
    with pytest.raises(ValueError, match="overlapping chunks"):  # DCP's own plan check
        write_torch_dist(tmp_path / "d", overlap, {}, {})
    assert not list(tmp_path.glob("[cd]/*.distcp"))  # refused at planning time
