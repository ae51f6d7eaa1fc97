"""Writing HF checkpoints: sharded safetensors streamed tensor by tensor, and the HF assets.

Why planned shards: HF shard file names carry the shard count
(``model-00001-of-00003.safetensors``).  All shapes and dtypes are known before any
tensor is read, so the tensors are assigned to shards up front, every shard's header
(names, dtypes, shapes, byte offsets) is fixed before its first tensor arrives, and each
tensor's bytes are written to their place as soon as it is produced -- memory holds the
tensor being written, never a shard or the whole model.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path

import torch

from dapo_megatron.checkpoint.hf_reader import INDEX_FILE, SAFETENSORS_DTYPES, SINGLE_FILE

__all__ = [
    "HF_ASSET_FILES",
    "ShardedSafetensorsWriter",
    "copy_hf_assets",
    "dtype_nbytes",
    "parse_size",
    "plan_shards",
]

# files copied next to exported weights: tokenizer, generation defaults, chat template
HF_ASSET_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


def parse_size(text: str | int) -> int:
    """``"5GB"`` / ``"500MB"`` / ``"2KiB"`` / ``1000`` -> bytes (decimal and binary units)."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    unit = next((u for u in units if s.endswith(u)), "")
    number, factor = (s[: -len(unit)], units[unit]) if unit else (s, 1)
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"invalid size {text!r} (examples: 5GB, 500MB, 2GiB, 1000000)") from None
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return int(value * factor)


def dtype_nbytes(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Greedy in-order packing of ``(name, nbytes)`` into shards of at most ``max_shard_bytes``.

    A tensor larger than the limit gets a shard of its own (as transformers does).
    """
    shards: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, nbytes in sizes:
        if current and used + nbytes > max_shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    if current:
        shards.append(current)
    return shards


_SAFETENSORS_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


class ShardedSafetensorsWriter:
    """Writes each tensor straight into its planned place in its safetensors shard.

    Single file ``model.safetensors`` for one shard; otherwise
    ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``.  A shard is
    written under a hidden ``.NAME.partial`` name and renamed once its last tensor is in,
    so a shard file that exists is complete.  Tensors may arrive in any order.
    """

    def __init__(
        self,
        out_dir: Path,
        plan: list[list[str]],
        specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
    ):
        """``plan``: tensor names per shard; ``specs``: name -> (shape, dtype) of every planned tensor."""
        self.out_dir = Path(out_dir)
        self.plan = plan
        self.n = len(plan)
        self._shard_of = {name: i for i, names in enumerate(plan) for name in names}
        missing = [name for name in self._shard_of if name not in specs]
        if missing:
            raise ValueError(f"no shape/dtype given for planned tensors {missing[:3]}")
        self._specs = {name: (tuple(specs[name][0]), specs[name][1]) for name in self._shard_of}
        self._layout: list[tuple[bytes, dict[str, tuple[int, int]]]] = [self._header(names) for names in plan]
        self._files: dict[int, object] = {}
        self._added: dict[int, set[str]] = {}
        self._written: set[int] = set()

    def _header(self, names: list[str]) -> tuple[bytes, dict[str, tuple[int, int]]]:
        entries: dict[str, dict] = {"__metadata__": {"format": "pt"}}
        offsets: dict[str, tuple[int, int]] = {}
        pos = 0
        for name in names:
            shape, dtype = self._specs[name]
            if dtype not in _SAFETENSORS_DTYPE_NAMES:
                raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
            nbytes = math.prod(shape) * dtype_nbytes(dtype)
            entries[name] = {"dtype": _SAFETENSORS_DTYPE_NAMES[dtype], "shape": list(shape)}
            entries[name]["data_offsets"] = [pos, pos + nbytes]
            offsets[name] = (pos, nbytes)
            pos += nbytes
        header = json.dumps(entries, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the format allows space padding; keeps the data 8-byte aligned
        return struct.pack("<Q", len(header)) + header, offsets

    def file_name(self, i: int) -> str:
        return SINGLE_FILE if self.n == 1 else f"model-{i + 1:05d}-of-{self.n:05d}.safetensors"

    def _partial(self, i: int) -> Path:
        return self.out_dir / f".{self.file_name(i)}.partial"

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor's bytes into its shard; the shard is renamed into place once complete."""
        if name not in self._shard_of:
            raise KeyError(f"tensor {name!r} is not in the shard plan")
        i = self._shard_of[name]
        added = self._added.setdefault(i, set())
        if name in added:
            raise ValueError(f"tensor {name!r} added twice")
        shape, dtype = self._specs[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(
                f"tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, the shard plan says {shape} {dtype}"
            )
        header, offsets = self._layout[i]
        if i not in self._files:
            f = open(self._partial(i), "w+b")  # noqa: SIM115  (kept open until the shard is complete)
            f.write(header)
            self._files[i] = f
        f = self._files[i]
        start, _ = offsets[name]
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        f.seek(len(header) + start)
        f.write(memoryview(data.numpy()))
        added.add(name)
        if len(added) == len(self.plan[i]):
            f.flush()
            os.fsync(f.fileno())
            f.close()
            del self._files[i]
            os.replace(self._partial(i), self.out_dir / self.file_name(i))
            self._written.add(i)

    def close(self) -> None:
        """Close shard files still open (after an error); their ``.partial`` files stay incomplete."""
        for f in self._files.values():
            f.close()
        self._files.clear()

    def finish(self) -> None:
        """Check every shard was written; write the index for multi-shard output."""
        missing = [n for i, names in enumerate(self.plan) if i not in self._written for n in names]
        if missing:
            self.close()
            raise RuntimeError(f"export incomplete: {len(missing)} tensors never produced, e.g. {missing[:3]}")
        if self.n > 1:
            total = sum(nbytes for _, offsets in self._layout for _, nbytes in offsets.values())
            index = {
                "metadata": {"total_size": total},
                "weight_map": {name: self.file_name(i) for i, names in enumerate(self.plan) for name in names},
            }
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))


def copy_hf_assets(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> list[str]:
    """Copy tokenizer / generation-config files that exist in ``src_dir``; returns their names."""
    copied = []
    for name in HF_ASSET_FILES:
        src = Path(src_dir) / name
        if src.is_file():
            shutil.copy2(src, Path(dst_dir) / name)
            copied.append(name)
    return copied
