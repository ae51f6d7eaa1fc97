"""Reading HF safetensors checkpoints: headers for planning and validation, tensors on demand.

Why headers first: a header names every tensor with its dtype, shape and byte range, so
the converter validates and plans a whole checkpoint in seconds without reading tensor
data, and a file shorter than its header says (an interrupted download) is caught before
anything is written.  Both the header scan and the tensor reader resolve names to files
through :func:`scan_hf_safetensors`, so single-file and sharded (index + shards)
checkpoints are read alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# dtype names of the safetensors header
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsError(ValueError):
    """A safetensors file or index is missing, truncated or corrupt; the message names it."""


@dataclass(frozen=True)
class TensorInfo:
    """Where an HF tensor lives and what its header says."""

    file: str
    dtype: str
    shape: tuple[int, ...]


def read_safetensors_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Tensor names -> :class:`TensorInfo` from a safetensors header, checking the file is complete.

    Raises:
        SafetensorsError: unreadable header or a file shorter than its header says (truncated).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafetensorsError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise SafetensorsError(f"{path}: truncated safetensors file (header of {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path}: corrupt safetensors header ({e})") from None
    out: dict[str, TensorInfo] = {}
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin_off, end_off = entry["data_offsets"]
            out[name] = TensorInfo(path.name, str(entry["dtype"]), tuple(int(x) for x in entry["shape"]))
        except (KeyError, TypeError, ValueError) as e:
            raise SafetensorsError(f"{path}: corrupt safetensors header entry {name!r} ({e})") from None
        end = max(end, int(end_off))
    if 8 + n + end > size:
        raise SafetensorsError(
            f"{path}: truncated safetensors file: header needs {8 + n + end} bytes, file has {size} "
            "(interrupted download or copy?)"
        )
    return out


def scan_hf_safetensors(hf_dir: str | os.PathLike) -> dict[str, TensorInfo]:
    """Every tensor of an HF checkpoint (single file or index + shards), headers only.

    Raises:
        SafetensorsError: no safetensors, a shard named in the index is missing, a tensor
            listed in the index is not in its shard, or a shard is truncated.
    """
    hf_dir = Path(hf_dir)
    index = hf_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise SafetensorsError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        missing = [fn for fn in files if not (hf_dir / fn).is_file()]
        if missing:
            raise SafetensorsError(f"{index} lists shard file(s) that do not exist in {hf_dir}: {', '.join(missing)}")
        tensors: dict[str, TensorInfo] = {}
        for fn in files:
            tensors.update(read_safetensors_header(hf_dir / fn))
        absent = [(name, fn) for name, fn in weight_map.items() if tensors.get(name, TensorInfo(fn, "", ())).file != fn]
        if absent:
            name, fn = absent[0]
            raise SafetensorsError(f"{index} maps {name!r} to {fn}, which does not contain it ({len(absent)} such)")
        return tensors
    single = hf_dir / SINGLE_FILE
    if not single.is_file():
        raise SafetensorsError(f"no {SINGLE_FILE} or {INDEX_FILE} in {hf_dir} (only safetensors are supported)")
    return read_safetensors_header(single)


@contextlib.contextmanager
def open_hf_safetensors(hf_dir: str | os.PathLike, *, reopen: bool = False) -> Iterator[Callable[[str], torch.Tensor]]:
    """Context manager yielding ``get(name) -> torch.Tensor`` over an HF safetensors checkpoint.

    Tensors are read on demand (CPU).  ``reopen=True`` opens the tensor's file for each read
    and closes it right after.  Why: safetensors maps the file and serves tensors from the
    mapping, and an open handle keeps every page it has served resident (counted in the
    process RSS) until it is closed, so a pass over a whole checkpoint through one handle
    ends up holding the whole file.  With ``reopen`` a tensor's pages stay only while the
    tensor lives; the cost is one header parse per read.

    Raises:
        SafetensorsError: as :func:`scan_hf_safetensors`.
    """
    hf_dir = Path(hf_dir)
    where = {name: info.file for name, info in scan_hf_safetensors(hf_dir).items()}
    with contextlib.ExitStack() as stack:
        files = set() if reopen else set(where.values())
        handles = {fn: stack.enter_context(safe_open(str(hf_dir / fn), framework="pt")) for fn in files}

        def get(name: str) -> torch.Tensor:
            fn = where.get(name)
            if fn is None:
                raise KeyError(f"HF checkpoint {str(hf_dir)!r} has no tensor {name!r}")
            if not reopen:
                return handles[fn].get_tensor(name)
            with safe_open(str(hf_dir / fn), framework="pt") as f:
                return f.get_tensor(name)

        yield get
