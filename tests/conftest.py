"""Fixtures shared by the unit, dist and e2e tests."""

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
