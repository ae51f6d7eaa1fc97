"""MegatronActor (log-probs, DAPO update, optimizer) against an HF oracle, under torchrun gloo.

One 2-rank launch runs every check of ``workers/actor_update_worker.py`` (exact global
normalisation for all loss_agg_modes at DP=2 with 1 or 4+ micro-batches, TP1/TP2/TP2+SP/PP2
equivalence over 3 optimizer steps, the non-finite skip/raise logic); a 4-rank launch checks
TP2xDP2, PP2xDP2, TP2xPP2 and TP2+SPxDP2.
"""

from __future__ import annotations

import re

import pytest

from dapo_megatron.algo.loss import LOSS_AGG_MODES
from tests.dist._launch import run_torchrun


@pytest.mark.dist
def test_actor_update_matches_hf_oracle_across_layouts(tiny_qwen2_dirs):
    proc = run_torchrun("actor_update_worker.py", list(tiny_qwen2_dirs), nproc=2, timeout=480)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ACTOR-OK")]
    grads = {(m.group(1), m.group(2)) for ln in lines if (m := re.search(r"grad mode=(\S+) budget=(\S+)", ln))}
    assert grads == {(mode, b) for mode in LOSS_AGG_MODES for b in ("256", "small", "fixed3")}, proc.stdout
    layouts = {m.group(1) for ln in lines if (m := re.search(r"layout (tp=\d pp=\d sp=\d tied=\d)", ln))}
    assert layouts == {
        "tp=1 pp=1 sp=0 tied=0",
        "tp=2 pp=1 sp=0 tied=0",
        "tp=2 pp=1 sp=1 tied=0",
        "tp=1 pp=2 sp=0 tied=0",
        "tp=1 pp=1 sp=0 tied=1",
        "tp=1 pp=2 sp=0 tied=1",
    }, proc.stdout
    assert any("uneven dp" in ln for ln in lines), proc.stdout
    assert any("nonfinite" in ln for ln in lines), proc.stdout
    assert any("onpolicy" in ln for ln in lines), proc.stdout


@pytest.mark.dist
def test_actor_update_four_ranks_tp_pp_dp(tiny_qwen2_dirs):
    """TP2xDP2 (baseline), PP2xDP2, TP2xPP2 and TP2+SPxDP2 on 4 ranks, untied and tied embeddings."""
    proc = run_torchrun(
        "actor_update_worker.py", ["--layouts-only", "2x1,1x2,2x2,2x1sp", *tiny_qwen2_dirs], nproc=4, timeout=480
    )
    layouts = {
        m.group(1)
        for ln in proc.stdout.splitlines()
        if (m := re.search(r"ACTOR-OK layout (tp=\d pp=\d sp=\d tied=\d)", ln))
    }
    expected = {
        f"tp={tp} pp={pp} sp={sp} tied={tied}"
        for tp, pp, sp in ((2, 1, 0), (1, 2, 0), (2, 2, 0), (2, 1, 1))
        for tied in (0, 1)
    }
    assert layouts == expected, proc.stdout
