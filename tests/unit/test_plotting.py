"""Figures draw this run beside committed reference runs with the same settings."""
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
