"""Figures draw this run beside committed reference runs with the same settings."""
import pytest
import matplotlib

matplotlib.use("Agg")
import pandas as pd  # noqa: E402

from krul.plotting import plot_fig4_accuracy  # noqa: E402


def test_fig4_draws_two_runs_with_the_same_settings():
    rows = []
    for run in ("cpu-smoke", "cpu-default"):
        for pol, ratio in (("full-load", 1.0), ("krul", 1.3)):
            rows.append({"run": run, "model": "smollm2-135m", "dataset": "sharegpt", "policy": pol,
                         "nll_ratio": ratio, "nll_ratio_ci_lo": ratio - 0.1, "nll_ratio_ci_hi": ratio + 0.1,
                         "greedy_match_rate": 1.0, "greedy_ci_lo": 1.0, "greedy_ci_hi": 1.0,
                         "rougeL_vs_full_load": 1.0, "rougeL_vs_reference": None})
    fig = plot_fig4_accuracy(pd.DataFrame(rows))
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert len(labels) == 2 and all("sharegpt" in t for t in labels)


def test_calibration_curves_overlay_joins_a_policys_points_and_refuses_other_conversations():
    from krul.plotting import plot_calibration_curves

    def rec(points, convs=("a", "b")):
        return {"model": "m", "split": "test", "conversations": list(convs), "points": [
            {"policy": p, "n_pairs": k, "compression_ratio": c, "nll_ratio": y, "nll_ratio_lo": y - 0.01,
             "nll_ratio_hi": y + 0.01} for p, k, c, y in points]}

    merge = rec([("krul", 1, 1.03, 1.02), ("krul", 4, 1.13, 1.2)])
    svd = rec([("krul-svd", 4, 1.15, 1.004), ("krul", 8, 1.3, 1.5)])
    svd["points"][0]["rank_ratio"] = 0.47
    fig = plot_calibration_curves(merge, svd)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    lines = {label: h.lines[0] for h, label in zip(handles, labels) if hasattr(h, "lines")}
    assert list(lines["krul"].get_xdata()) == [1.03, 1.13, 1.3]  # one line, ordered by compression
    assert list(lines["krul-svd (rank 0.47)"].get_ydata()) == [1.004]
    with pytest.raises(ValueError, match="share model"):
        plot_calibration_curves(merge, rec([], convs=("c",)))
