"""Across pipeline stages each rank receives only the slices it asks for (weight_sync/gather.py), no engine.

One torchrun launch on 4 ranks (gloo) runs ``workers/stage_gather_worker.py`` for actor
TP1xPP2 (x DP2), TP2xPP2 and TP1xPP4 on a tied and an untied Qwen2: tensors equal the whole-tensor
walk on the needed slice and are NaN elsewhere, the bytes received equal the needed slices' bytes
(a stage that sent more fails), and a bad slice fails every rank.  The engine-side end to end checks
(vLLM's own slices, parity, verification) are in ``test_rollout_sync.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.dist._launch import run_torchrun

LAYOUTS = ["1x2", "2x2", "1x4"]


@pytest.mark.dist
def test_cross_stage_walk_sends_only_needed_slices(tiny_hf_models):
    dirs = tiny_hf_models[:2]  # qwen2 untied and tied
    stdout = run_torchrun(
        "stage_gather_worker.py", ["--layouts", ",".join(LAYOUTS), *dirs], nproc=4, timeout=400
    ).stdout
    models = [Path(d).name for d in dirs]
    for layout in LAYOUTS:
        tp, pp = layout.split("x")
        for model in models:
            label = f"tp={tp} pp={pp} model={model}"
            for variant in ("all", "mixed"):
                assert f"CHECK {label} variant={variant} " in stdout, (label, variant, stdout)
            assert f"CHECK {label} bad_slice_fails_everywhere" in stdout, (label, stdout)
    ratios = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"CHECK (tp=\S+ pp=\S+ model=\S+) variant=all .* ratio=(\S+)", stdout)
    }
    assert len(ratios) == len(LAYOUTS) * len(models)
    for label, ratio in ratios.items():  # engine TP 2 (PP2) / 4 (PP4): about 1/2 and 1/4 of the old bytes
        bound = 0.3 if "pp=4" in label else 0.55
        assert ratio < bound, (label, ratio)
