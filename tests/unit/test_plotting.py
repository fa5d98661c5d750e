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


# --- every figure readable (issue 22 item 5) -------------------------------------------------------
import inspect  # noqa: E402
import re  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from krul import paths, plotting  # noqa: E402

# every plot_* function of krul.plotting, so a new figure is checked as soon as it exists
PLOTS = sorted(name for name, f in inspect.getmembers(plotting, inspect.isfunction)
               if name.startswith("plot_") and f.__module__ == plotting.__name__)
# axis labels that need no unit
UNITLESS = {"layer", "policy", "stream", "conversation", "model and dataset", "mode", "model", "budget setting",
            "run", "tier", "throughput measure"}  # categorical axes (ticks carry any unit)
UNIT = re.compile(r"\(.*\S.*\)")
MIN_FONT_PT = 8
MAX_WIDTH_IN = 14.5


def _calibration_records():
    pts = [{"policy": p, "n_pairs": k, "compression_ratio": c, "nll_ratio": y, "nll_ratio_lo": y - 0.01,
            "nll_ratio_hi": y + 0.01} for p, k, c, y in (("krul", 1, 1.03, 1.02), ("krul", 4, 1.13, 1.2),
                                                          ("krul-svd", 4, 1.15, 1.004))]
    return ({"model": "m", "split": "test", "conversations": ["a", "b"], "points": pts},), {
        "policy", "n_pairs", "compression_ratio", "nll_ratio", "nll_ratio_lo", "nll_ratio_hi", "rank_ratio"}


def _fig10_trace_rows():
    rows = []
    for budget_set in ("default", "forced"):
        for k, pol in enumerate(("full-recompute", "full-load", "cake", "krul")):
            r = 1.0 if pol == "full-recompute" else 1.2 + 0.3 * k
            rows.append({"budget_set": budget_set, "model": "smollm2-135m", "policy": pol,
                         "role": "krul-family" if pol == "krul" else "baseline", "prefill_tokens_per_s": 900 * r,
                         "turns_per_s": 2.0 * r, "ttft_p50_s": 0.4 / r, "prefill_tokens_per_s_vs_full_recompute": r,
                         "turns_per_s_vs_full_recompute": r, "ttft_p50_vs_full_recompute": 1 / r,
                         "ttft_p95_vs_full_recompute": 1.1 / r, "ttft_p99_vs_full_recompute": 1.2 / r})
    df = pd.DataFrame(rows).assign(run="cpu-default")
    return (df,), set(df.columns)


# plot functions whose input is not a figure's tidy frame (or that have no committed reference data)
SYNTHETIC = {"plot_calibration_curves": _calibration_records, "plot_fig10_throughput": _fig10_trace_rows}


def _inputs(name):
    """The committed reference runs of the figure (results/<slug>/reference/*/data.csv, all overlaid as
    `redraw` does), else a synthetic input; and the raw column names no text may show."""
    slug = name[len("plot_"):]
    refs = sorted((paths.REPO_ROOT / "results" / slug / "reference").glob("*/data.csv"))
    if refs:
        df = pd.concat([pd.read_csv(p).assign(run=p.parent.name) for p in refs], ignore_index=True, sort=False)
        return (df,), set(df.columns) | {"panel", "value", "metric", "stored_MB", "setting"}
    if name in SYNTHETIC:
        return SYNTHETIC[name]()
    pytest.fail(f"{name} has neither committed reference data under results/{slug}/reference/ nor a synthetic "
                "input in SYNTHETIC: add one so its readability is checked")


def _is_data_axes(ax):
    return ax.axison and ax.get_visible() and ax.get_label() != "<colorbar>" and not hasattr(ax, "_colorbar") \
        and ax.has_data()


def _titles(fig):
    out = [fig._suptitle] if fig._suptitle is not None and fig._suptitle.get_text() else []
    for ax in fig.axes:
        if ax.get_visible():
            out += [t for t in (ax.title, ax._left_title, ax._right_title) if t.get_text()]
    return out


def _raw(text, columns):
    """Is `text` a raw column name, or does it show one (an underscore name inside a longer text)?"""
    text = text.strip()
    return (text in columns and text not in UNITLESS) or any("_" in c and c in text for c in columns) \
        or any(re.search(rf"(^|\W){re.escape(c)} = ", text) for c in columns)  # seaborn's "col = value"


def readability_problems(fig, columns) -> list[str]:
    problems = []
    width = fig.get_size_inches()[0]
    if width > MAX_WIDTH_IN:
        problems.append(f"figure {width:.1f} in wide (> {MAX_WIDTH_IN})")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labels = []
    for i, ax in enumerate(a for a in fig.axes if _is_data_axes(a)):
        for which, label in (("x", ax.xaxis.label), ("y", ax.yaxis.label)):
            text = label.get_text().strip()
            if not text:
                problems.append(f"axes {i}: empty {which} label")
            elif text not in UNITLESS and not UNIT.search(text):
                problems.append(f"axes {i}: {which} label {text!r} has no unit in parentheses")
            if label.get_visible() and text:
                labels.append(label)
    legends = [a.get_legend() for a in fig.axes if a.get_legend()] + list(fig.legends)
    shown = [t.get_text() for t in _titles(fig) + labels]
    shown += [leg.get_title().get_text() for leg in legends if leg.get_title().get_text()]
    shown += [t.get_text() for leg in legends for t in leg.get_texts()]
    problems += [f"raw column name shown: {t!r}" for t in shown if _raw(t, columns)]
    titles = _titles(fig)
    boxes = [(t.get_text(), t.get_window_extent(renderer).shrunk(0.98, 0.9)) for t in titles]
    for (a, ba), (b, bb) in ((p, q) for k, p in enumerate(boxes) for q in boxes[k + 1:]):
        if ba.overlaps(bb):
            problems.append(f"titles overlap: {a!r} and {b!r}")
    for t in titles:
        bt = t.get_window_extent(renderer).shrunk(0.98, 0.9)
        for label in labels:
            if bt.overlaps(label.get_window_extent(renderer).shrunk(0.98, 0.9)):
                problems.append(f"title {t.get_text()!r} overlaps label {label.get_text()!r}")
    small = {(t.get_text()[:30], round(t.get_fontsize(), 1)) for t in fig.findobj(Text)
             if t.get_visible() and t.get_text().strip() and t.get_fontsize() < MIN_FONT_PT}
    problems += [f"text {s!r} at {pt} pt (< {MIN_FONT_PT})" for s, pt in sorted(small)]
    return problems


@pytest.mark.parametrize("name", PLOTS)
def test_every_figure_is_readable(name):
    """Every data axes has labelled axes with units, no raw column names, titles that do not collide
    with each other or with labels, and legible sizes -- for every plot_* function of krul.plotting."""
    args, columns = _inputs(name)
    fig = getattr(plotting, name)(*args)
    try:
        assert [a for a in fig.axes if _is_data_axes(a)], f"{name} drew no data"
        assert readability_problems(fig, columns) == []
    finally:
        plt.close(fig)


def test_the_readability_check_can_fail():
    """A raw column name as a label, a label without unit and two colliding titles are all caught."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(4, 3))
    a.plot([1, 2], [1, 2])
    a.set_xlabel("ttft_s")
    a.set_ylabel("latency")
    a.set_title("a very long title that runs into its neighbour's title for sure")
    b.plot([1, 2], [1, 2])
    b.set_xlabel("history length (tokens)")
    b.set_ylabel("TTFT (s)")
    b.set_title("another very long title that runs into its neighbour's title")
    problems = readability_problems(fig, {"ttft_s"})
    plt.close(fig)
    assert any("'ttft_s' has no unit" in p for p in problems)
    assert any("raw column name shown: 'ttft_s'" in p for p in problems)
    assert any("'latency' has no unit" in p for p in problems)
    assert any(p.startswith("titles overlap") for p in problems)


def test_krul_looks_the_same_in_every_figure():
    """krul: one colour and marker, drawn above every baseline; baselines keep distinct looks."""
    k = plotting._style(plotting.KRUL)
    assert k["zorder"] > max(plotting._style(p)["zorder"] for p in plotting._POLICY_STYLES)
    looks = [(s["color"], s["marker"]) for s in map(plotting._style, plotting._POLICY_STYLES)]
    assert len(set(looks)) == len(looks) and (k["color"], k["marker"]) not in looks
