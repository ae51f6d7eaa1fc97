"""The demo's summary: held-out curve with its noise, merged rows, and a verdict a newcomer can act on."""

from __future__ import annotations

import json
import math

import pytest

from dapo_megatron.demo import held_out_curve, summarize, verdict
from dapo_megatron.sft import WarmupTarget, held_out_accuracy

KEY, SEM = "val-core/arith/acc/mean@8", "val-aux/arith/acc/sem@8"


def test_curve_reads_accuracy_and_its_standard_error():
    rows = [
        {"step": 0, KEY: 0.25, SEM: 0.010},
        {"step": 1, "critic/score/mean": 0.0},
        {"step": 4, KEY: 0.30, SEM: 0.012},
        {"step": 4, "timing_s/save_checkpoint": 2.0},
    ]
    assert held_out_curve(rows) == [(0, 0.25, 0.010), (4, 0.30, 0.012)]
    two_sources = [{"step": 0, KEY: 0.2, SEM: 0.03, "val-core/b/acc/mean@8": 0.4, "val-aux/b/acc/sem@8": 0.04}]
    ((_, acc, se),) = held_out_curve(two_sources)
    assert acc == pytest.approx(0.3) and se == pytest.approx(0.025)  # sqrt(0.03^2 + 0.04^2) / 2
    assert math.isnan(held_out_curve([{"step": 0, KEY: 0.2}])[0][2])


def test_verdict_compares_the_gain_with_three_times_its_noise():
    # noise of the difference: hypot(0.006, 0.008) = 1.0 point
    assert verdict((0, 0.25, 0.006), (100, 0.34, 0.008)) == (
        "learned: +9.0 points of held-out accuracy from step 0 to 100 (noise ±1.0)"
    )
    line = verdict((0, 0.25, 0.006), (100, 0.27, 0.008))
    assert line.startswith("did not learn: +2.0 points from step 0 to 100 is within 3x the noise (±1.0)")
    assert verdict((0, 0.25, 0.006), (100, 0.20, 0.008)).startswith("did not learn: -5.0 points")
    assert verdict((0, 0.25, float("nan")), (100, 0.40, 0.01)).startswith("no verdict")


def test_summary_ends_with_the_verdict_and_sums_each_save_once(tmp_path, capsys):
    rows = [
        {"step": 0, KEY: 0.25, SEM: 0.006, "timing_s/testing": 3.0},
        {"step": 1, "timing_s/gen": 1.0, "timing_s/step": 2.0},
        {"step": 1, "timing_s/save_checkpoint": 4.0},
        {"step": 2, KEY: 0.35, SEM: 0.008, "timing_s/gen": 1.0, "timing_s/step": 2.0},
        {"step": 2, "timing_s/save_checkpoint": 4.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    warmup = {"steps": 450, "max_steps": 1000, "held_out_acc": 0.25, "band": [0.2, 0.4]}
    out = summarize(tmp_path, {"sft": 1.0}, tmp_path / "dashboard.png", warmup=warmup)
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == "learned: +10.0 points of held-out accuracy from step 0 to 2 (noise ±1.0)"
    assert "warm-up: 450 of at most 1000 steps, held-out accuracy 0.250 (band 0.20-0.40)" in printed
    assert out["stages"]["save_checkpoint"] == 8.0


def test_warmup_target_names_a_bad_band_and_accuracy_needs_a_val_core_metric():
    with pytest.raises(ValueError, match=r"low <= high.*\[0.4, 0.2\]"):
        WarmupTarget(0.4, 0.2)
    with pytest.raises(ValueError, match="need eval_every >= 1 and first_eval >= 0, got 0, 500"):
        WarmupTarget(eval_every=0)
    with pytest.raises(ValueError, match="weight decay"):
        WarmupTarget(weight_decay=-0.1)
    assert held_out_accuracy({"val-core/a/acc/mean@8": 0.2, "val-core/b/acc/mean@8": 0.4}) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="no val-core/<source>/acc/mean@k metric"):
        held_out_accuracy({"val-aux/a/pass@8": 1.0})


def test_warmup_evaluates_sparsely_far_below_the_band_and_every_eval_every_near_it():
    t = WarmupTarget(0.20, 0.40, eval_every=25, first_eval=200)
    assert t.first_evaluation() == 200
    assert WarmupTarget(eval_every=25, first_eval=210).first_evaluation() == 225
    assert WarmupTarget(eval_every=25, first_eval=0).first_evaluation() == 25
    assert t.next_evaluation(200, 0.02) == 250  # under half the bottom (0.10): twice as far
    assert t.next_evaluation(250, 0.10) == 275  # from half the bottom on: every eval_every
    assert t.next_evaluation(275, 0.15) == 300


# Held-out accuracy at the steps each warm-up evaluated, from three rows of bench/RESULTS.md's
# robustness table (evaluation started at step 200 then): seed 0 (evaluated every 25 steps),
# seed 0 on one thread (the earliest stop) and seed 4.
# fmt: off
RECORDED_WARMUPS = {
    "seed 0": (950, dict(zip(range(200, 951, 25), (
        0.0175, 0.01875, 0.025, 0.02875, 0.0275, 0.03375, 0.035625, 0.038125, 0.051875, 0.049375, 0.06,
        0.065, 0.06375, 0.0775, 0.07625, 0.08375, 0.084375, 0.088125, 0.094375, 0.101875, 0.105,
        0.116875, 0.1275, 0.148125, 0.130625, 0.140625, 0.16125, 0.146875, 0.17625, 0.173125, 0.219375,
    ), strict=True))),
    "seed 0, 1 thread": (675, {
        200: 0.014375, 250: 0.01625, 300: 0.0275, 350: 0.03875, 400: 0.050625, 450: 0.061875,
        500: 0.075625, 550: 0.094375, 600: 0.12, 625: 0.136875, 650: 0.184375, 675: 0.2125,
    }),
    "seed 4": (825, {
        200: 0.023125, 250: 0.024375, 300: 0.035625, 350: 0.043125, 400: 0.05125, 450: 0.0625,
        500: 0.068125, 550: 0.08125, 600: 0.08875, 650: 0.108125, 675: 0.1075, 700: 0.14,
        725: 0.13625, 750: 0.155625, 775: 0.175625, 800: 0.199375, 825: 0.206875,
    }),
}
# fmt: on


@pytest.mark.parametrize("name", sorted(RECORDED_WARMUPS))
def test_the_first_evaluation_at_500_stops_recorded_warmups_where_they_stopped(name):
    """The default schedule, replayed on recorded accuracies, evaluates only steps that were
    evaluated (a step missing from the record raises KeyError) and stops on the recorded stop."""
    stop, acc_at = RECORDED_WARMUPS[name]
    target = WarmupTarget()
    assert target.first_evaluation() == 500
    step = target.first_evaluation()
    while acc_at[step] < target.low:
        step = target.next_evaluation(step, acc_at[step])
    assert step == stop
