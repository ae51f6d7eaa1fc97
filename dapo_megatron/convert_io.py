"""Output side of the conversion CLI: staged output directories, sharded safetensors, HF assets.

Why staging: a conversion either produces a complete directory or nothing.  Output is
written into a hidden sibling ``.NAME.tmp-PID`` and renamed to ``NAME`` only after the
last byte is written; on any error the staging directory is removed.

Why planned shards: HF shard file names carry the shard count
(``model-00001-of-00003.safetensors``).  All shapes and dtypes are known before any
tensor is read, so the tensors are assigned to shards up front and each shard is
written as soon as its tensors have been produced -- memory stays at one shard plus
the tensors in flight, never the whole model.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = [
    "HF_ASSET_FILES",
    "ShardedSafetensorsWriter",
    "copy_hf_assets",
    "dtype_nbytes",
    "ensure_output_free",
    "parse_size",
    "plan_shards",
    "staged_output_dir",
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


def ensure_output_free(out: str | os.PathLike) -> None:
    """Raise FileExistsError unless ``out`` is absent or an empty directory."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output {out} already exists and is not empty")


@contextlib.contextmanager
def staged_output_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging directory that becomes ``out`` on success, vanishes on error.

    Raises:
        FileExistsError: ``out`` exists and is not empty (nothing is ever overwritten).
    """
    out = Path(out)
    ensure_output_free(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()  # empty (checked above)
    os.rename(stage, out)


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


class ShardedSafetensorsWriter:
    """Collects tensors and writes each planned shard as soon as it is complete.

    Single file ``model.safetensors`` for one shard; otherwise
    ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``.
    """

    def __init__(self, out_dir: Path, plan: list[list[str]]):
        self.out_dir = Path(out_dir)
        self.plan = plan
        self.n = len(plan)
        self._shard_of = {name: i for i, names in enumerate(plan) for name in names}
        self._pending: dict[int, dict[str, torch.Tensor]] = {}
        self._written: set[int] = set()
        self._total_bytes = 0

    def file_name(self, i: int) -> str:
        return "model.safetensors" if self.n == 1 else f"model-{i + 1:05d}-of-{self.n:05d}.safetensors"

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor; writes its shard once every tensor of that shard is queued."""
        from safetensors.torch import save_file

        if name not in self._shard_of:
            raise KeyError(f"tensor {name!r} is not in the shard plan")
        i = self._shard_of[name]
        pending = self._pending.setdefault(i, {})
        if name in pending or i in self._written:
            raise ValueError(f"tensor {name!r} added twice")
        pending[name] = tensor.detach().contiguous()
        if len(pending) == len(self.plan[i]):
            save_file(pending, str(self.out_dir / self.file_name(i)), metadata={"format": "pt"})
            self._total_bytes += sum(t.numel() * t.element_size() for t in pending.values())
            del self._pending[i]
            self._written.add(i)

    def finish(self) -> None:
        """Check every shard was written; write the index for multi-shard output."""
        missing = [n for i, names in enumerate(self.plan) if i not in self._written for n in names]
        if missing:
            raise RuntimeError(f"export incomplete: {len(missing)} tensors never produced, e.g. {missing[:3]}")
        if self.n > 1:
            index = {
                "metadata": {"total_size": self._total_bytes},
                "weight_map": {name: self.file_name(i) for i, names in enumerate(self.plan) for name in names},
            }
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))


def copy_hf_assets(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> list[str]:
    """Copy tokenizer / generation-config files that exist in ``src_dir``; returns their names."""
    copied = []
    for name in HF_ASSET_FILES:
        src = Path(src_dir) / name
        if src.is_file():
            shutil.copy2(src, Path(dst_dir) / name)
            copied.append(name)
    return copied
