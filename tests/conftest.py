"""Fixtures shared by the unit, dist and e2e tests.

The tiny models themselves come from ``tests/tiny_models.py`` (importable by torchrun workers
too); the launch helpers are ``tests/dist/_launch.py`` and ``tests/e2e/_runs.py``.  pytest.ini
puts the repository root on ``sys.path``, so tests import them as ``tests.<...>``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture
def mount_tmpfs(tmp_path) -> Callable[[int], Path]:
    """A function that mounts a tmpfs of ``size_kib`` under ``tmp_path`` and returns it; unmounted
    after the test; skips (``pytest.skip.Exception``) where mounting is refused (not root; CI runs
    as root).  Why a real small file system: a full disk is a real ENOSPC from the kernel in
    the middle of real writes, which no mock of ``open`` reproduces faithfully."""
    mounted: list[Path] = []

    def mount(size_kib: int) -> Path:
        target = tmp_path / f"tmpfs{len(mounted)}"
        target.mkdir()
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(target)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            pytest.skip(f"a tmpfs cannot be mounted here (needs root): {proc.stderr.strip() or proc.returncode}")
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", "--lazy", str(target)], check=True)


@pytest.fixture(scope="session")
def tiny_hf_models(tmp_path_factory) -> list[str]:
    """Directories of qwen2_untied, qwen2_tied, qwen3_tied, llama_untied
    (``tests.tiny_models.make_tiny_hf_models``), built once; read-only."""
    from tests.tiny_models import make_tiny_hf_models

    return make_tiny_hf_models(tmp_path_factory.mktemp("tiny_hf_models"))


@pytest.fixture(scope="session")
def tiny_qwen2_dirs(tmp_path_factory) -> tuple[str, str]:
    """The actor tests' Qwen2 (``tests.tiny_models.save_actor_qwen2``), untied and tied; read-only."""
    from tests.tiny_models import save_actor_qwen2

    root = tmp_path_factory.mktemp("tiny_qwen2")
    return save_actor_qwen2(root / "untied", False), save_actor_qwen2(root / "tied", True)
