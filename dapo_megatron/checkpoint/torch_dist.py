"""Megatron ``torch_dist`` checkpoints read and written through torch.distributed.checkpoint (DCP) directly.

A torch_dist checkpoint is a DCP checkpoint (``.metadata`` + data files; each megatron
``ShardedTensor.key`` is one DCP tensor made of chunks, each ``ShardedObject`` one byte
blob under its ``unique_key``) plus megatron's ``metadata.json`` and its common
(non-sharded) state.  The converter uses DCP's own planner hooks instead of
``megatron.core.dist_checkpointing.save``/``load`` for two reasons:

* **Memory when writing.**  Megatron's ``save`` takes a state dict of materialised
  tensors and its writer stages them all before writing; torch's one-file-per-rank
  writer also keeps a file's tensors until the file is closed.  :func:`write_torch_dist`
  hands DCP a plan of chunk *descriptions* (key, offset, shape, dtype) and produces each
  chunk only when the writer asks for it (``SavePlanner.resolve_data``), one data file
  per chunk, so one converted tensor is in memory at a time.
* **Megatron versions when reading.**  ``dist_checkpointing.load`` first loads the common
  state, which moved between megatron-core releases (``common.pt`` up to 0.16, a
  ``common_state`` object inside the DCP files in 0.19), so one release cannot read the
  other's checkpoints.  Export needs tensors only: :class:`TorchDistReader` loads any
  rectangular region (e.g. one layer of a stacked tensor) of any stored tensor through a
  DCP load plan, whichever release wrote the checkpoint.

The written common state goes where the *installed* megatron-core puts it, so a
converted checkpoint is exactly what that release's own ``save`` would produce for the
model (:func:`common_state_in_dcp`).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from megatron.core.dist_checkpointing import serialization
from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
from megatron.core.dist_checkpointing.mapping import ShardedObject
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

__all__ = [
    "ChunkSpec",
    "Region",
    "TorchDistReader",
    "common_state_in_dcp",
    "write_torch_dist",
]

COMMON_STATE_FILE = "common.pt"  # megatron-core <= 0.16 keeps the common state here
COMMON_STATE_KEY = "common_state"  # megatron-core 0.19 keeps it as this ShardedObject


@dataclass(frozen=True)
class ChunkSpec:
    """One chunk of a stored tensor: where it sits in the global tensor, and its dtype.

    ``label`` names the chunk in error messages (e.g. the Megatron parameter).
    """

    key: str
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    label: str

    def __post_init__(self) -> None:
        dims = len(self.global_shape)
        if len(self.offset) != dims or len(self.shape) != dims:
            raise ValueError(f"{self.label}: offset/shape/global shape of different ranks")
        for o, s, g in zip(self.offset, self.shape, self.global_shape, strict=True):
            if o < 0 or s < 0 or o + s > g:
                raise ValueError(
                    f"{self.label}: chunk at {self.offset} of shape {self.shape} leaves {self.key} {self.global_shape}"
                )


@dataclass(frozen=True)
class Region:
    """A rectangular region of a stored tensor to read: ``tensor[offset : offset + shape]``."""

    key: str
    offset: tuple[int, ...]
    shape: tuple[int, ...]


def common_state_in_dcp() -> bool:
    """Whether the installed megatron-core stores the common state inside the DCP files.

    0.19 does (``save`` adds a ``common_state`` ShardedObject and has no common-save
    strategy any more); 0.16 writes ``common.pt`` through its ``torch`` common strategy.
    Probed by feature rather than version number, so releases in between follow whichever
    scheme they implement.
    """
    return not hasattr(serialization, "get_default_save_common_strategy")


# ----------------------------------------------------------------------------- writing
def _check_tiling(specs: list[ChunkSpec]) -> None:
    """Every key's chunks agree on global shape and dtype, and their volumes add up to it.

    With DCP's own check that no two chunks overlap (run for every plan), this means the
    chunks tile each tensor exactly; DCP checks the volume only for multi-rank saves.
    """
    by_key: dict[str, list[ChunkSpec]] = {}
    for spec in specs:
        by_key.setdefault(spec.key, []).append(spec)
    for key, group in by_key.items():
        first = group[0]
        for spec in group[1:]:
            if (spec.global_shape, spec.dtype) != (first.global_shape, first.dtype):
                raise ValueError(
                    f"{key}: {spec.label} has global shape {spec.global_shape} {spec.dtype}, "
                    f"{first.label} {first.global_shape} {first.dtype}"
                )
        volume = sum(math.prod(spec.shape) for spec in group)
        if volume != math.prod(first.global_shape):
            raise ValueError(
                f"{key}: chunks hold {volume} of the {math.prod(first.global_shape)} elements of {first.global_shape}"
            )


class _LazySavePlanner(DefaultSavePlanner):
    """Plans chunks from their descriptions; ``resolve_data`` produces each one on demand."""

    def __init__(
        self,
        chunks: list[tuple[ChunkSpec, Callable[[], torch.Tensor]]],
        blobs: Mapping[str, Any],
        on_chunk: Callable[[ChunkSpec], None] | None,
    ):
        # flat keys, no sharded tensors: DCP's global checks (bounds, overlaps) still run
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._chunks = {(spec.key, spec.offset): (spec, produce) for spec, produce in chunks}
        if len(self._chunks) != len(chunks):
            raise ValueError("two chunks of the same tensor at the same offset")
        self._order = [(spec.key, spec.offset) for spec, _ in chunks]
        _check_tiling([spec for spec, _ in chunks])
        self._blobs = dict(blobs)
        self._on_chunk = on_chunk

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator: bool = False) -> None:
        self.state_dict = state_dict
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> SavePlan:
        items = [WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO) for key in self._blobs]
        for key, offset in self._order:
            spec, _ = self._chunks[(key, offset)]
            items.append(
                WriteItem(
                    index=MetadataIndex(spec.key, torch.Size(spec.offset)),
                    type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(offsets=torch.Size(spec.offset), sizes=torch.Size(spec.shape)),
                        properties=TensorProperties(dtype=spec.dtype),
                        size=torch.Size(spec.global_shape),
                    ),
                )
            )
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        fqn = write_item.index.fqn
        if write_item.type == WriteItemType.BYTE_IO:
            buf = io.BytesIO()
            torch.save([self._blobs[fqn]], buf)  # megatron stores a list of the objects' data
            return buf
        spec, produce = self._chunks[(fqn, tuple(write_item.index.offset))]
        tensor = produce()
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(
                f"{spec.label}: produced {tuple(tensor.shape)} {tensor.dtype}, planned {spec.shape} {spec.dtype}"
            )
        if self._on_chunk is not None:
            self._on_chunk(spec)
        # the writer clones tensors whose storage is larger than they are; do it here, once
        tensor = tensor.contiguous()
        return tensor if tensor.untyped_storage().nbytes() == tensor.nbytes else tensor.clone()


def write_torch_dist(
    directory: str | os.PathLike,
    chunks: Iterable[tuple[ChunkSpec, Callable[[], torch.Tensor]]],
    objects: Mapping[str, Any],
    common: dict[str, Any],
    *,
    on_chunk: Callable[[ChunkSpec], None] | None = None,
) -> None:
    """Write a torch_dist checkpoint whose tensors are produced one chunk at a time.

    Args:
        directory: an empty or missing directory.
        chunks: ``(spec, produce)`` pairs; ``produce()`` returns the chunk's tensor (shape
            and dtype as in ``spec``); called once, in order, by the writer.  The chunks of
            each key must tile its global shape exactly (checked before anything is written).
        objects: megatron ShardedObject ``unique_key`` -> data (e.g. ``_extra_state``).
        common: megatron's common state dict (non-sharded entries), stored where the
            installed megatron-core expects it.
        on_chunk: called after each chunk has been produced (progress).

    Raises:
        FileExistsError: ``directory`` is not empty.
        The first error raised while producing a chunk or writing a file (unwrapped from
        DCP's ``CheckpointException``); ``directory`` is then incomplete (no ``metadata.json``)
        and must be discarded.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if any(directory.iterdir()):
        raise FileExistsError(f"{directory} is not empty")
    blobs = dict(objects)
    in_dcp = common_state_in_dcp()
    if in_dcp:
        blobs[ShardedObject(COMMON_STATE_KEY, None, (1,), (0,)).unique_key] = common
    planner = _LazySavePlanner(list(chunks), blobs, on_chunk)
    # one file per item: torch's writer keeps every tensor of a file until the file is closed
    writer = FileSystemWriter(
        directory, single_file_per_rank=False, thread_count=1, per_thread_copy_ahead=0, overwrite=False
    )
    try:
        dcp.save({}, storage_writer=writer, planner=planner, no_dist=True)
    except CheckpointException as e:
        raise _first_failure(e) from None
    if not in_dcp:
        torch.save(common, directory / COMMON_STATE_FILE)
    save_config(CheckpointingConfig("torch_dist", 1), str(directory))  # marks the checkpoint complete


def _first_failure(e: CheckpointException) -> BaseException:
    for failure in e.failures.values():
        exc = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(exc, BaseException):
            return exc
    return e


# ----------------------------------------------------------------------------- reading
class _MetadataOnceReader(FileSystemReader):
    """Reads ``.metadata`` once (every DCP load asks for it again)."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self._metadata: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is None:
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata


class _RegionLoadPlanner(LoadPlanner):
    """Reads requested regions of stored tensors into fresh tensors (DCP reshards from any chunking)."""

    def __init__(self, regions: list[Region], dests: list[torch.Tensor]):
        self._regions = regions
        self._dests = {(r.key, r.offset): d for r, d in zip(regions, dests, strict=True)}
        if len(self._dests) != len(regions):
            raise ValueError("the same region was requested twice")

    def set_up_planner(self, state_dict, metadata: Metadata | None = None, is_coordinator: bool = False) -> None:
        if metadata is None:
            raise ValueError("DCP gave the planner no checkpoint metadata")
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items: list[ReadItem] = []
        for region in self._regions:
            md = self.metadata.state_dict_metadata[region.key]
            chunk = ChunkStorageMetadata(offsets=torch.Size(region.offset), sizes=torch.Size(region.shape))
            reads = create_read_items_for_chunk_list(region.key, md, [chunk])
            covered = sum(math.prod(r.lengths) for r in reads)
            if covered != math.prod(region.shape):  # stored chunks never overlap (DCP checks on save)
                raise ValueError(
                    f"stored chunks of {region.key} cover {covered} of the {math.prod(region.shape)} elements "
                    f"of region offset={region.offset} shape={region.shape}"
                )
            items += reads
        return LoadPlan(items)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise TypeError(f"{read_item.dest_index.fqn}: a byte object was read as a tensor region")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        dest = self._dests[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths, strict=True)):
            dest = dest.narrow(dim, start, length)
        return dest

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # the reader copied into the view of the destination


class TorchDistReader:
    """The tensors of one torch_dist checkpoint, read region by region (no process group needed).

    Raises:
        FileNotFoundError: ``directory`` has no DCP ``.metadata`` file.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not (self.directory / ".metadata").is_file():
            raise FileNotFoundError(f"{directory} is not a torch_dist checkpoint (no .metadata file)")
        self._storage = _MetadataOnceReader(self.directory)
        md = self._storage.read_metadata()
        self.tensors: dict[str, TensorStorageMetadata] = {
            k: v for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)
        }

    def read(self, regions: list[Region]) -> list[torch.Tensor]:
        """Each region as a new tensor (stored dtype), all in one DCP load.

        Raises:
            KeyError: a region names a tensor the checkpoint does not have.
            ValueError: a region lies outside the stored tensor or is not fully stored.
        """
        dests = []
        for r in regions:
            md = self.tensors.get(r.key)
            if md is None:
                raise KeyError(f"checkpoint {self.directory} has no tensor {r.key!r}")
            ChunkSpec(r.key, tuple(md.size), r.offset, r.shape, md.properties.dtype, label=r.key)  # bounds check
            dests.append(torch.empty(r.shape, dtype=md.properties.dtype))
        planner = _RegionLoadPlanner(regions, dests)
        try:
            dcp.load({}, storage_reader=self._storage, planner=planner, no_dist=True)
        except CheckpointException as e:
            raise _first_failure(e) from None
        return dests
