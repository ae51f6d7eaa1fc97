"""A user's reward function from a Python file, as verl's ``custom_reward_function.path/name``.

Why a path rather than an import string: researchers keep reward code next to their
experiment, not in an installed package. The scorer carries only (path, name), so it
pickles into worker processes and Ray tasks, and each worker imports the file once.

The function is called as ``fn(solution_str, ground_truth)`` and returns either a dict
with ``score`` and ``acc`` (and optionally ``pred``), or a number: the score, with
``acc = score > 0``. What it raises, or how long it hangs, is the pool's business: such
a response scores -1 and is counted (``reward/num_errors``, ``reward/num_timeouts``).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from types import ModuleType

__all__ = ["FileScorer", "load_file_scorer"]

_MODULES: dict[str, ModuleType] = {}


def _import_file(path: str) -> ModuleType:
    if path not in _MODULES:
        spec = importlib.util.spec_from_file_location(f"dapo_custom_reward_{len(_MODULES)}", path)
        if spec is None or spec.loader is None:
            raise ImportError(f"reward.custom_function.path: cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MODULES[path] = module
    return _MODULES[path]


@dataclass(frozen=True)
class FileScorer:
    path: str
    name: str

    def __call__(self, solution_str: str, ground_truth: str) -> dict:
        out = getattr(_import_file(self.path), self.name)(solution_str, ground_truth)
        if isinstance(out, dict):
            return out
        if isinstance(out, bool) or not isinstance(out, (int, float)):
            raise TypeError(f"{self.name} returned {type(out).__name__}; expected a dict or a number")
        return {"score": float(out), "acc": float(out) > 0, "pred": ""}

    def warmup(self) -> None:
        _import_file(self.path)


def load_file_scorer(path: str, name: str) -> FileScorer:
    """Import the file once here, so a wrong path or name fails before any worker starts."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reward.custom_function.path: file not found: {path}")
    module = _import_file(path)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise AttributeError(f"reward.custom_function.name: {path} has no function {name!r}")
    return FileScorer(path, name)
