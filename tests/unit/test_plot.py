"""The plot CLI turns a run's metrics.jsonl into PNG dashboards, and says why when it cannot."""

import json
import math

from dapo_megatron.observability.plot import PANELS, main, plot_run


def _write_run(run_dir, steps=12, with_val=True):
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for s in range(1, steps + 1):
            row = {
                "step": s,
                "critic/score/mean": -0.5 + s / steps,
                "response_length/mean": 20 + s,
                "response_length/max": 32,
                "response_length/clip_ratio": 0.1,
                "actor/entropy": 1.0 / s,
                "actor/pg_clipfrac": 0.02,
                "actor/pg_clipfrac_lower": 0.001,
                "train/num_gen_batches": 1 + s % 3,
                "timing_s/gen": 2.0,
                "timing_s/update_actor": 1.0,
                "actor/grad_norm": 2.0 / s,
                "actor/lr": 1e-6 * min(1.0, s / 5),
            }
            if with_val and s % 4 == 0:
                row["val-core/synthetic_arith/acc/mean@4"] = 0.3 + s / 100
            f.write(json.dumps(row) + "\n")


def _is_png_with_content(path):
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and float(img[..., :3].std()) > 0.01


def test_writes_a_png_per_panel_and_a_dashboard(tmp_path):
    run = tmp_path / "run"
    _write_run(run)
    paths = plot_run(run)
    assert [p.name for p in paths] == [f"{stem}.png" for stem, *_ in PANELS] + ["dashboard.png"]
    assert all(_is_png_with_content(p) for p in paths)


def test_missing_metrics_make_an_empty_panel_not_a_crash(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "actor/entropy": math.nan}) + "\n")
    assert len(plot_run(run, tmp_path / "out")) == len(PANELS) + 1


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no metrics.jsonl in" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("")
    assert main([str(tmp_path)]) == 2
    assert "holds no step rows yet" in capsys.readouterr().err
    _write_run(tmp_path / "ok")
    assert main([str(tmp_path / "ok")]) == 0


def test_accuracy_panel_shades_two_standard_errors_around_each_estimate():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dapo_megatron.observability.plot import _draw_panel

    rows = [
        {"step": 0, "val-core/s/acc/mean@8": 0.25, "val-aux/s/acc/sem@8": 0.01},
        {"step": 1, "critic/score/mean": -0.5},
        {"step": 4, "val-core/s/acc/mean@8": 0.30, "val-aux/s/acc/sem@8": 0.02},
    ]
    _, title, specs, ylabel = PANELS[0]
    fig, ax = plt.subplots()
    assert _draw_panel(ax, rows, title, specs, ylabel)
    (band,) = ax.collections
    ys = band.get_paths()[0].vertices[:, 1]
    assert math.isclose(ys.min(), 0.23) and math.isclose(ys.max(), 0.34)
    plt.close(fig)
    # A run that logged no standard error draws its curve without a band.
    fig, ax = plt.subplots()
    assert _draw_panel(ax, [{k: v for k, v in r.items() if "sem@" not in k} for r in rows], title, specs, ylabel)
    assert not ax.collections
    plt.close(fig)
