"""The SFT warm-up's export (``sft.export_hf``) through the checkpoint package's safetensors writer."""

from __future__ import annotations

import pytest

from tests.dist._launch import run_torchrun


@pytest.mark.dist
def test_export_hf_writes_the_actor_as_an_hf_checkpoint(tiny_qwen2_dirs, tmp_path):
    proc = run_torchrun("sft_export_worker.py", [str(tmp_path), *tiny_qwen2_dirs], nproc=2, timeout=240)
    assert proc.stdout.count("EXPORT ok") == 2, proc.stdout
