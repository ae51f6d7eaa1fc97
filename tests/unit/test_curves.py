"""Learning curves from metrics rows, and the tokens-to-reach-accuracy ratio used by bench/vs_trl.py."""

import pytest

from bench.curves import Curve, CurvePoint, curve_from_metrics, first_reaching, tokens_ratio_to_reach

ACC = "val-core/synthetic_arith/acc/mean@4"


def _rows():
    return [
        {"step": 0, ACC: 0.30, "timing_s/testing": 9.0},
        {"step": 1, "rollout/generated_tokens": 100.0, "timing_s/step": 2.0},
        {"step": 2, "rollout/generated_tokens": 300.0, "timing_s/step": 7.0, "timing_s/testing": 4.0, ACC: 0.35},
        {"step": 3, "rollout/generated_tokens": 50.0, "timing_s/step": 1.5},
        {"step": 4, "rollout/generated_tokens": 150.0, "timing_s/step": 6.5, "timing_s/testing": 5.0, ACC: 0.40},
    ]


def _curve(name, pts):
    return Curve(name, ACC, tuple(CurvePoint(s, t, t / 100, a) for s, t, a in pts))


def test_costs_accumulate_through_each_evaluation_and_exclude_validation_time():
    curve = curve_from_metrics(_rows(), "ours")
    assert curve.metric == ACC
    assert [(p.step, p.tokens, p.seconds, p.acc) for p in curve.points] == [
        (0, 0.0, 0.0, 0.30),
        (2, 400.0, 5.0, 0.35),  # 2 + (7 - 4)
        (4, 600.0, 8.0, 0.40),  # 5 + 1.5 + (6.5 - 5)
    ]


def test_row_order_in_the_file_does_not_matter():
    rows = _rows()
    assert curve_from_metrics(rows[::-1], "x") == curve_from_metrics(rows, "x")


def test_a_step_logged_twice_is_refused_not_counted_twice():
    rows = [*_rows(), {"step": 3, "rollout/generated_tokens": 50.0, "timing_s/step": 1.5}]
    with pytest.raises(ValueError, match="step 3 has two training rows"):
        curve_from_metrics(rows, "x")


def test_a_training_row_without_step_time_names_the_key():
    rows = _rows()
    del rows[3]["timing_s/step"]
    with pytest.raises(ValueError, match="step 3 lacks 'timing_s/step'"):
        curve_from_metrics(rows, "x")


def test_metrics_without_validation_or_with_two_sources_are_refused():
    rows = [{k: v for k, v in r.items() if k != ACC} for r in _rows()]
    with pytest.raises(ValueError, match="no 'val-core/<source>/acc/mean@K' metric"):
        curve_from_metrics(rows, "x")
    rows = _rows()
    rows[0]["val-core/other/acc/mean@4"] = 0.1
    with pytest.raises(ValueError, match="several held-out accuracy metrics"):
        curve_from_metrics(rows, "x")


def test_curves_must_move_forward_and_hold_accuracies():
    with pytest.raises(ValueError, match="steps must increase"):
        _curve("x", [(0, 0, 0.3), (0, 10, 0.3)])
    with pytest.raises(ValueError, match="must not decrease"):
        _curve("x", [(0, 10, 0.3), (1, 5, 0.3)])
    with pytest.raises(ValueError, match="outside"):
        _curve("x", [(0, 0, 1.5)])
    with pytest.raises(ValueError, match="no evaluations"):
        Curve("x", ACC, ())


def test_dict_round_trip():
    curve = curve_from_metrics(_rows(), "ours")
    assert Curve.from_dict(curve.to_dict()) == curve
    with pytest.raises(ValueError, match="lacks field 'points'"):
        Curve.from_dict({"name": "x", "metric": ACC})


def test_first_reaching_takes_the_first_evaluation_at_or_above():
    curve = _curve("x", [(0, 0, 0.30), (10, 1000, 0.36), (20, 2000, 0.34), (30, 3000, 0.40)])
    assert first_reaching(curve, 0.35).step == 10
    assert first_reaching(curve, 0.36).step == 10  # equal counts as reached
    assert first_reaching(curve, 0.30).step == 0
    assert first_reaching(curve, 0.41) is None


def test_ratio_of_tokens_to_reach_the_baselines_final_accuracy():
    trl = _curve("trl", [(0, 0, 0.33), (10, 1000, 0.36), (20, 2000, 0.38)])
    ours = _curve("ours", [(0, 0, 0.34), (10, 3000, 0.38), (20, 6000, 0.45)])
    r = tokens_ratio_to_reach(ours, trl)
    assert r["target_acc"] == 0.38
    assert r["ours_point"]["tokens"] == 3000 and r["baseline_point"]["tokens"] == 2000
    assert r["ratio"] == pytest.approx(1.5)


def test_baseline_credited_for_reaching_its_final_accuracy_early():
    trl = _curve("trl", [(0, 0, 0.33), (10, 1000, 0.38), (20, 2000, 0.38)])
    ours = _curve("ours", [(0, 0, 0.34), (10, 3000, 0.39)])
    assert tokens_ratio_to_reach(ours, trl)["ratio"] == pytest.approx(3.0)


def test_no_ratio_when_ours_never_gets_there_or_the_baseline_never_moved():
    trl = _curve("trl", [(0, 0, 0.33), (10, 1000, 0.40)])
    never = tokens_ratio_to_reach(_curve("ours", [(0, 0, 0.34), (10, 3000, 0.39)]), trl)
    assert never["ratio"] is None and never["ours_point"] is None
    assert "ours never reached 0.4000 (best 0.3900)" in never["reason"]
    flat = _curve("trl", [(0, 0, 0.35), (10, 1000, 0.33)])
    moot = tokens_ratio_to_reach(_curve("ours", [(0, 0, 0.34), (10, 3000, 0.39)]), flat)
    assert moot["ratio"] is None and "before training" in moot["reason"]
    explicit = tokens_ratio_to_reach(trl, trl, target=0.5)
    assert explicit["ratio"] is None and "trl never reached 0.5000" in explicit["reason"]
