"""Optimizer + schedule state saved at one TP/PP layout resumes at others (two torchrun launches).

Launch 1 trains at TP2 and saves (then exits: the "kill"); launch 2 resumes at PP2 and at
TP1xDP2 and must land on the weights, loss and grad norm of runs that trained at those
layouts without interruption, while a resume with the Adam moments zeroed must not.
"""

from __future__ import annotations

import re

import pytest

from tests.dist._launch import run_torchrun


@pytest.mark.dist
def test_optimizer_state_resumes_at_other_layouts(tiny_hf_models, tmp_path):
    qwen2_untied = tiny_hf_models[0]
    common = ["--hf-dir", qwen2_untied, "--root", tmp_path / "ckpt"]
    saved = run_torchrun("ckpt_reshard_worker.py", ["save", *common, "--layout", "2x1"], timeout=300)
    assert "RESHARD-SAVED tp=2 pp=1" in saved.stdout, saved.stdout
    resumed = run_torchrun("ckpt_reshard_worker.py", ["resume", *common, "--layouts", "1x2,1x1"], timeout=300)
    done = set(re.findall(r"RESHARD-OK saved tp=2 pp=1 -> (tp=\d pp=\d dp=\d)", resumed.stdout))
    assert done == {"tp=1 pp=2 dp=1", "tp=1 pp=1 dp=2"}, resumed.stdout
