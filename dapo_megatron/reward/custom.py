"""A user's reward function from a Python file, as verl's ``custom_reward_function.path/name``.

Why a path rather than an import string: researchers keep reward code next to their
experiment, not in an installed package. The scorer carries only (path, name, style), so it
pickles into worker processes and Ray tasks, and each worker imports the file once.

Two signatures are accepted, told apart by inspecting the function once at load time, so a
verl user's reward file works unchanged:

* ours: ``fn(solution_str, ground_truth)``;
* verl's: ``fn(data_source, solution_str, ground_truth, extra_info=None)``, called with
  keywords as verl's reward managers call it, with each prompt's ``data_source`` and
  ``extra_info`` from the data file.

Either returns a dict with ``score`` (and optionally ``acc`` and ``pred``), or a number: the
score. Where ``acc`` is not given it is ``score > 0``, the rule verl's DAPO results follow.
What it raises, or how long it hangs, is the pool's business: such a response scores -1 and
is counted (``reward/num_errors``, ``reward/num_timeouts``).
"""

from __future__ import annotations

import importlib.util
import inspect
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

__all__ = ["FileScorer", "load_file_scorer"]

_MODULES: dict[str, ModuleType] = {}
_VERL_PARAMS = ("data_source", "solution_str", "ground_truth")


def _import_file(path: str) -> ModuleType:
    if path not in _MODULES:
        spec = importlib.util.spec_from_file_location(f"dapo_custom_reward_{len(_MODULES)}", path)
        if spec is None or spec.loader is None:
            raise ImportError(f"reward.custom_function.path: cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MODULES[path] = module
    return _MODULES[path]


def _style(fn: Any, where: str) -> str:
    """ "verl" when the function takes verl's named arguments, "ours" for two positional ones."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError) as exc:
        raise TypeError(f"reward.custom_function.name: cannot read the signature of {where}: {exc}") from exc
    if all(p in params for p in _VERL_PARAMS):
        return "verl"
    positional = [
        p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if len(positional) == 2 or (len(positional) < 2 and any(p.kind is p.VAR_POSITIONAL for p in params.values())):
        return "ours"
    raise TypeError(
        f"reward.custom_function.name: {where} takes ({', '.join(params)}); expected "
        "(solution_str, ground_truth) or verl's (data_source, solution_str, ground_truth, extra_info=None)"
    )


@dataclass(frozen=True)
class FileScorer:
    path: str
    name: str
    style: str = "ours"  # "ours" or "verl", decided by load_file_scorer

    @property
    def takes_context(self) -> bool:
        """The pool passes (data_source, extra_info) only to scorers that need them."""
        return self.style == "verl"

    def __call__(self, solution_str: str, ground_truth: str, context: tuple[str, Any] | None = None) -> dict:
        fn = getattr(_import_file(self.path), self.name)
        if self.style == "verl":
            data_source, extra_info = context if context is not None else (None, None)
            out = fn(
                data_source=data_source, solution_str=solution_str, ground_truth=ground_truth, extra_info=extra_info
            )
        else:
            out = fn(solution_str, ground_truth)
        if isinstance(out, Mapping):
            if "score" not in out:
                raise KeyError(f"{self.name} returned a dict without 'score' (keys: {sorted(out)})")
            score = float(out["score"])
            acc = bool(out["acc"]) if "acc" in out else score > 0
            return {"score": score, "acc": acc, "pred": str(out.get("pred", ""))}
        if isinstance(out, bool) or not isinstance(out, numbers.Real):
            raise TypeError(f"{self.name} returned {type(out).__name__}; expected a dict or a number")
        return {"score": float(out), "acc": float(out) > 0, "pred": ""}

    def warmup(self) -> None:
        _import_file(self.path)


def load_file_scorer(path: str, name: str) -> FileScorer:
    """Import the file once here, so a wrong path, name or signature fails before any worker starts."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reward.custom_function.path: file not found: {path}")
    module = _import_file(path)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise AttributeError(f"reward.custom_function.name: {path} has no function {name!r}")
    return FileScorer(path, name, _style(fn, f"{name} in {path}"))
