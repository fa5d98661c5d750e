"""One `plot_<slug>(df) -> matplotlib Figure` per figure, from the tidy DataFrames of `experiments`.

Every function accepts the rows of several runs at once (column `run`, e.g. `cpu-default` and a
committed `h100-full` reference) and draws them together; it draws an explanatory empty panel when
there is nothing to draw. This module computes no measurements and knows no paths.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as mticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

sns.set_theme(style="whitegrid", context="paper")


def _empty(title: str, why: str = "not measured in this run"):
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()
    ax.set_title(title)
    return fig


def _runs(df: pd.DataFrame) -> pd.DataFrame:
    if "run" not in df:
        df = df.assign(run="this run")
    return df


# One fixed look per policy in every figure, so a reader can follow a policy from figure to figure:
# krul always in one red, as a large star, drawn on top of everything; full-load hollow and larger, so
# that a policy with the same values (krul-fix stores what full-load stores) shows inside it.
KRUL = "krul"
_KRUL_STYLE = dict(color="#d62728", marker="*", linestyle="-", linewidth=2.4, markersize=11, zorder=10)
_POLICY_STYLES = {
    "full-load": dict(color="#222222", marker="o", linestyle="--", markerfacecolor="none", markersize=9,
                      markeredgewidth=1.4),
    "full-recompute": dict(color="#1f77b4", marker="s", linestyle="-"),
    "partial-recompute": dict(color="#2ca02c", marker="^", linestyle=":"),
    "cake": dict(color="#9467bd", marker="v", linestyle="-."),
    "minicache": dict(color="#8c564b", marker="D", linestyle="--", markersize=5),
    "kvsharer": dict(color="#e377c2", marker="P", linestyle=":"),
    "krul-fix": dict(color="#ff7f0e", marker="x", linestyle="-.", markersize=7, markeredgewidth=1.6),
    "krul-fixed-split": dict(color="#bcbd22", marker="X", linestyle="--"),
    "krul-svd-loss": dict(color="#17becf", marker="h", linestyle="-"),
    "krul-share": dict(color="#7f7f7f", marker="p", linestyle=":"),
    "krul-no-preempt": dict(color="#ff9896", marker="d", linestyle="-."),
    # the storage policies (issue 19): svd pairs in blues, their quantized forms darker; quantization
    # alone in greens (dotted), h2o's eviction in grey
    "krul-svd": dict(color="#6baed6", marker="o", linestyle="-"),
    "krul-fix-svd": dict(color="#6baed6", marker="x", linestyle="--"),
    "krul-fix-svd-loss": dict(color="#17becf", marker="x", linestyle="--", markeredgewidth=1.6),
    "krul-svd-loss-int8": dict(color="#1f5fa8", marker="h", linestyle="-"),
    "krul-svd-loss-int4": dict(color="#0b2e59", marker="H", linestyle="-"),
    "int8": dict(color="#74c476", marker=">", linestyle=":"),
    "int4": dict(color="#238b45", marker="<", linestyle=":"),
    "kivi": dict(color="#00441b", marker="*", linestyle=":", markersize=8),
    "h2o": dict(color="#7f7f7f", marker="v", linestyle="-."),
}
_FALLBACK = [("#393b79", "<"), ("#637939", ">"), ("#8c6d31", "1"), ("#843c39", "2"), ("#7b4173", "3")]
_LINESTYLES = ["-", "--", ":", "-."]
FULL_LOAD_LINE = dict(color="#222222", lw=1.0, ls="-", zorder=2)
TITLE_SIZE = 11
# the axis label of each measured quantity, with its unit
LABELS = {
    "history_tokens": "history length (tokens)",
    "ttft_s": "TTFT (s)",
    "restore_s": "restore time (s)",
    "stored_MB": "stored KV (MB)",
    "storage_ratio": "storage ratio (x, bf16 bytes)",
    "nll_ratio": "nll ratio to full-load (x)",
    "seq_len": "sequence length (tokens)",
    "recompute_ratio": "recompute ratio (fraction of KV recomputed)",
}


def _style(policy: str, k: int = 0) -> dict:
    """Line2D keywords of a policy (ax.plot / ax.errorbar); unknown policies get a fallback look."""
    if policy == KRUL:
        return dict(_KRUL_STYLE)
    s = _POLICY_STYLES.get(policy)
    if s is None:
        color, marker = _FALLBACK[k % len(_FALLBACK)]
        s = dict(color=color, marker=marker, linestyle=_LINESTYLES[k % len(_LINESTYLES)])
    return {"linewidth": 1.4, "markersize": 6, "zorder": 3, **s}


def _policies(d: pd.DataFrame) -> list[str]:
    """Policies in order of appearance, krul first (legend) -- it is drawn on top by zorder."""
    pols = [str(p) for p in dict.fromkeys(d.policy)]
    return sorted(pols, key=lambda p: p != KRUL)


def _full_load_line(ax, y: float = 1.0, label: str = "full-load (ratio 1.0)"):
    ax.axhline(y, label=label, **FULL_LOAD_LINE)


def _policy_lines(ax, d: pd.DataFrame, x: str, y: str, lo: str | None = None, hi: str | None = None,
                  dodge: float = 0.0, label_suffix: str = ""):
    """One line per policy: the median over rows with the same x, whiskers from `lo`/`hi` (their
    min/max) when given. `dodge` shifts policy k by a factor 2**(dodge * (k - centre)) along a log x
    axis so that policies with equal values stay visible side by side."""
    pols = _policies(d)
    centre = (len(pols) - 1) / 2
    for k, pol in enumerate(pols):
        g = d[d.policy == pol].dropna(subset=[y])
        if g.empty:
            continue
        med = g.groupby(x)[y].median().sort_index()
        xs = med.index.to_numpy(dtype=float) * 2.0 ** (dodge * (k - centre))
        err = None
        if lo and hi and lo in g and hi in g:
            low, high = g.groupby(x)[lo].min().reindex(med.index), g.groupby(x)[hi].max().reindex(med.index)
            err = np.vstack([(med - low).clip(lower=0).fillna(0), (high - med).clip(lower=0).fillna(0)])
        ax.errorbar(xs, med.to_numpy(), yerr=err, capsize=2 if err is not None else 0, elinewidth=0.8,
                    label=pol + label_suffix, **_style(pol, k))


def _log2_ticks(ax, values):
    """A log2 x axis whose ticks are the measured values themselves."""
    vals = sorted({float(v) for v in values if pd.notna(v) and v > 0})
    ax.set_xscale("log", base=2)
    if vals:
        ax.set_xticks(vals)
        ax.set_xticklabels([f"{v:g}" for v in vals])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlim(vals[0] / 1.35, vals[-1] * 1.35)


def _note(fig, text: str):
    """A footnote under the panels (as supxlabel, so constrained layout keeps room for it)."""
    fig.supxlabel(text, fontsize=8, x=0.0, ha="left", color="#444444")


def _dedup_legend(ax_or_fig, handles_from, **kw):
    """One legend entry per label (several axes share policies)."""
    seen = {}
    for ax in handles_from:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    if seen:
        ax_or_fig.legend(list(seen.values()), list(seen.keys()), **kw)


def plot_fig1_similarity_variability(df: pd.DataFrame):
    """Left: mean layer-pair distance; middle: spread (CV) of each pair over conversations;
    right: Jaccard overlap of the selected pairs between conversations."""
    title = "Fig. 1: attention similarity varies across conversations"
    if df.empty:
        return _empty(title)
    df = _runs(df)
    models = list(df.model.unique())
    fig, axes = plt.subplots(len(models), 3, figsize=(14, 4.6 * len(models)), squeeze=False, layout="constrained")
    for row, model in zip(axes, models):
        g = df[df.model == model]
        n = int(max(g.layer_a.max(), g.layer_b.max())) + 1
        mean = g.groupby(["layer_a", "layer_b"]).distance.mean()
        cv = g.groupby(["layer_a", "layer_b"]).distance.agg(lambda x: x.std(ddof=0) / x.mean() if x.mean() else 0)
        for ax, series, name, unit in (
                (row[0], mean, "mean distance of a layer pair", "L2 distance of attention maps"),
                (row[1], cv, "spread across conversations", "CV (std / mean)")):
            m = np.full((n, n), np.nan)
            for (a, b), v in series.items():
                m[a, b] = m[b, a] = v
            sns.heatmap(m, ax=ax, cmap="viridis", square=True, cbar_kws={"shrink": 0.8, "label": unit})
            ax.set_title(f"{model}\n{name}")
            ax.set_xlabel("layer")
            ax.set_ylabel("layer")
        sel = {cid: frozenset(zip(s.layer_a, s.layer_b)) for cid, s in g[g.selected].groupby("conversation_id")}
        ids = sorted(set(g.conversation_id))
        jac = np.ones((len(ids), len(ids)))
        for i, a in enumerate(ids):
            for j, b in enumerate(ids):
                u = sel.get(a, frozenset()) | sel.get(b, frozenset())
                jac[i, j] = len(sel.get(a, frozenset()) & sel.get(b, frozenset())) / len(u) if u else 1.0
        sns.heatmap(jac, ax=row[2], vmin=0, vmax=1, cmap="mako", square=True, annot=len(ids) <= 8, fmt=".2f",
                    annot_kws={"size": 8}, xticklabels=False, yticklabels=False,
                    cbar_kws={"shrink": 0.8, "label": "Jaccard overlap (0-1)"})
        off = jac[~np.eye(len(ids), dtype=bool)]
        row[2].set_title(f"{model}\nselected pairs shared by two conversations "
                         f"(mean {off.mean() if off.size else float('nan'):.2f})")
        row[2].set_xlabel("conversation")
        row[2].set_ylabel("conversation")
    fig.suptitle(title, fontsize=TITLE_SIZE)
    return fig


def plot_fig2_ttft(df: pd.DataFrame):
    """TTFT and restore time per policy vs history length; one column per (run, model, tier), rows
    TTFT then restore time; whiskers span the repeats' min..max."""
    title = "Fig. 2: TTFT per policy across history lengths and tiers"
    if df.empty or "ttft_s" not in df or df.ttft_s.dropna().empty:
        return _empty(title)
    df = _runs(df).copy()
    keys = list(df.groupby(["run", "model", "tier"], sort=False).groups)
    metrics = [m for m in ("ttft_s", "restore_s") if m in df and df[m].notna().any()]
    ncols = min(3, len(keys))
    blocks = -(-len(keys) // ncols)
    fig, axes = plt.subplots(blocks * len(metrics), ncols, figsize=(14, 3.3 * blocks * len(metrics)),
                             squeeze=False, layout="constrained")
    for i, (run, model, tier) in enumerate(keys):
        d = df[(df.run == run) & (df.model == model) & (df.tier == tier)]
        for j, m in enumerate(metrics):
            ax = axes[(i // ncols) * len(metrics) + j, i % ncols]
            _policy_lines(ax, d, "history_tokens", m, f"{m}_min", f"{m}_max", dodge=0.035)
            ax.set_yscale("log")
            _log2_ticks(ax, d.history_tokens)
            ax.set_xlabel(LABELS["history_tokens"])
            ax.set_ylabel(LABELS[m])
            ax.set_title(f"{'TTFT' if m == 'ttft_s' else 'restore time'}: {run}, {model}, {tier} tier",
                         fontsize=9.5)
    for k in range(len(keys), blocks * ncols):  # unused cells of the last block
        for j in range(len(metrics)):
            axes[(k // ncols) * len(metrics) + j, k % ncols].set_axis_off()
    _dedup_legend(fig, axes.flat, loc="outside right upper", title="policy")
    fig.suptitle(title, fontsize=TITLE_SIZE)
    _note(fig, "Points of a policy are shifted sideways by a few % so that equal values stay visible; "
               "whiskers: min..max over repeats.")
    return fig


def plot_fig3_storage(df: pd.DataFrame):
    """Stored bytes per policy and model vs history length (full KV as a thin grey line) and, when the
    rows carry it, the storage ratio (full KV bf16 bytes / stored bytes) with full-load's 1.0."""
    title = "Fig. 3: KV storage per policy"
    if df.empty:
        return _empty(title)
    df = _runs(df).copy()
    df["stored_MB"] = df.stored_bytes / 1e6
    keys = list(df.groupby(["run", "model"], sort=False).groups)
    metrics = ["stored_MB"] + (["storage_ratio"] if "storage_ratio" in df and df.storage_ratio.notna().any() else [])
    fig, axes = plt.subplots(len(metrics), len(keys), figsize=(min(14, 1.5 + 5.2 * len(keys)), 3.8 * len(metrics)),
                             squeeze=False, layout="constrained")
    for j, (run, model) in enumerate(keys):
        d = df[(df.run == run) & (df.model == model)]
        label = model if df.run.nunique() == 1 else f"{run}, {model}"
        for i, m in enumerate(metrics):
            ax = axes[i, j]
            if m == "stored_MB":
                full = d.groupby("history_tokens").full_kv_bytes.median().sort_index() / 1e6
                ax.plot(full.index, full.to_numpy(), color="0.6", lw=4, alpha=0.5, zorder=1, label="full KV (bf16)")
                _policy_lines(ax, d, "history_tokens", m)
            else:
                # full-recompute stores only token ids: its ratio (thousands) would flatten every other line
                huge = d.groupby("policy")[m].median() > 100
                shown = d[~d.policy.isin(huge[huge].index)]
                _policy_lines(ax, shown, "history_tokens", m)
                _full_load_line(ax)
                if huge.any():
                    hidden = ", ".join(f"{p} {d[d.policy == p][m].median():.0f}x" for p in huge[huge].index)
                    label += f"\n(off the axis, stores token ids only: {hidden})"
            ax.set_xlabel(LABELS["history_tokens"])
            ax.set_ylabel(LABELS[m])
            ax.set_title(label, fontsize=10)
    _dedup_legend(fig, axes.flat, loc="outside right upper", title="policy")
    fig.suptitle(title, fontsize=TITLE_SIZE)
    return fig


def _why_empty(setting: str, col: str) -> str:
    """Why a quality metric has no value for a (run | model | dataset) group."""
    if col.startswith("nll") and "mtbench" in setting:
        return "MT-Bench:\nuser turns only,\nno reply to\nscore nll on"
    if col == "rougeL_vs_reference" and "mtbench" not in setting:
        return "no GPT-4\nreference\n(MT-Bench only)"
    return "not scored\nin this run"


def plot_fig4_accuracy(df: pd.DataFrame):
    """nll ratio to full-load (paired bootstrap CI), greedy agreement (bootstrap CI), ROUGE-L; one
    point per policy, side by side within each (model, dataset) group."""
    title = "Fig. 4: quality per policy"
    if df.empty:
        return _empty(title)
    df = _runs(df).copy()
    df["setting"] = df.model + "\n" + df.dataset
    if df.run.nunique() > 1:  # this run beside committed references: one group per run
        df["setting"] = df.run.astype(str) + " | " + df.setting
    df = df.drop_duplicates(["setting", "policy"], keep="last")
    panels = [("nll_ratio", "nll_ratio_ci_lo", "nll_ratio_ci_hi", "reply nll relative to full-load (95% paired CI)",
               LABELS["nll_ratio"]),
              ("greedy_match_rate", "greedy_ci_lo", "greedy_ci_hi", "greedy agreement with full-load (95% CI)",
               "agreement (fraction of 32 tokens)"),
              ("rougeL_vs_full_load", None, None, "ROUGE-L vs full-load's reply", "ROUGE-L F1 (0-1)"),
              ("rougeL_vs_reference", None, None, "ROUGE-L vs GPT-4 reference (MT-Bench)", "ROUGE-L F1 (0-1)")]
    panels = [p for p in panels if p[0] in df]
    settings = sorted(df.setting.unique())
    ncols = 2 if len(panels) > 1 else 1
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(14, 4.4 * nrows), squeeze=False, layout="constrained")
    policies = _policies(df)
    width = 0.8 / max(1, len(policies))
    for ax, (col, lo, hi, name, ylabel) in zip(axes.flat, panels):
        for k, pol in enumerate(policies):
            d = df[df.policy == pol].set_index("setting").reindex(settings)
            x = np.arange(len(settings)) + (k - (len(policies) - 1) / 2) * width
            y = pd.to_numeric(d[col], errors="coerce")
            err = None
            if lo and hi:
                err = np.vstack([(y - pd.to_numeric(d[lo], errors="coerce")).clip(lower=0).fillna(0),
                                 (pd.to_numeric(d[hi], errors="coerce") - y).clip(lower=0).fillna(0)])
            ax.errorbar(x, y, yerr=err, capsize=2, elinewidth=0.8, label=pol, **{**_style(pol, k), "linestyle": "none"})
        values = pd.to_numeric(df[col], errors="coerce")
        for i, s in enumerate(settings):
            if pd.to_numeric(df.loc[df.setting == s, col], errors="coerce").isna().all():
                ax.text(i, 0.5, _why_empty(s, col), transform=ax.get_xaxis_transform(), ha="center",
                        va="center", fontsize=8, color="#555555")
        for i in range(1, len(settings)):
            ax.axvline(i - 0.5, color="0.85", lw=0.8, zorder=0)
        ax.set_xticks(np.arange(len(settings)))
        ax.set_xticklabels(settings, fontsize=8, rotation=20, ha="right", rotation_mode="anchor")
        ax.set_xlim(-0.5, len(settings) - 0.5)
        ax.grid(False, axis="x")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("model and dataset")
        ax.set_ylabel(ylabel)
        if col == "nll_ratio":
            _full_load_line(ax)
            ax.axhline(1.01, color="#d62728", lw=0.8, ls=":", label="full-load + 1%")
            top = values.max() if values.notna().any() else 1.1
            ax.set_ylim(min(0.9, values.min() - 0.05) if values.notna().any() else 0.9, max(1.1, top * 1.05))
        else:
            ax.set_ylim(-0.05, 1.08)
    for ax in axes.flat[len(panels):]:
        ax.set_axis_off()
    _dedup_legend(fig, axes.flat, loc="outside right upper", title="policy")
    fig.suptitle(title, fontsize=TITLE_SIZE)
    return fig


def plot_fig5_ratio_sweep(df: pd.DataFrame):
    """TTFT vs recompute ratio (median of the repeats, band min..max), one colour per history length;
    the scheduler's choice as a star."""
    title = "Fig. 5: TTFT vs recompute:load ratio"
    if df.empty:
        return _empty(title)
    df = _runs(df)
    sweep, choice = df[df.kind == "sweep"], df[df.kind == "scheduler"]
    models = list(df.model.unique())
    fig, axes = plt.subplots(1, len(models), figsize=(min(14, 1 + 6 * len(models)), 4.2), squeeze=False,
                             layout="constrained")
    hists = sorted(df.history_tokens.unique())
    colors = dict(zip(hists, sns.color_palette("viridis", len(hists))))
    runs = list(df.run.unique())
    for ax, model in zip(axes[0], models):
        for r, run in enumerate(runs):
            for h in hists:
                s = sweep[(sweep.model == model) & (sweep.run == run) & (sweep.history_tokens == h)]
                if s.empty:
                    continue
                g = s.groupby("recompute_ratio").ttft_s.agg(["median", "min", "max"]).sort_index()
                name = f"{h} tokens" + (f" ({run})" if len(runs) > 1 else "")
                ax.plot(g.index, g["median"], marker="o", color=colors[h], ls=_LINESTYLES[r % 4], label=name)
                ax.fill_between(g.index, g["min"], g["max"], color=colors[h], alpha=0.2, lw=0)
        c = choice[choice.model == model].groupby(["run", "history_tokens"]).agg(
            r=("recompute_ratio", "first"), t=("ttft_s", "median")).reset_index()
        if not c.empty:
            ax.plot(c.r, c.t, label="scheduler's choice (krul)", **{
                **_KRUL_STYLE, "linestyle": "none", "markersize": 16, "markeredgecolor": "k", "markeredgewidth": 0.6})
        ax.set_xlabel(LABELS["recompute_ratio"])
        ax.set_ylabel(LABELS["ttft_s"])
        ax.set_title(model, fontsize=10)
        ax.legend(title="history length", fontsize=8, title_fontsize=8)
    fig.suptitle(title, fontsize=TITLE_SIZE)
    return fig


def plot_fig6_restore_timeline(df: pd.DataFrame):
    """Per-layer bars of the recompute and load streams of one restore, fixed vs bubble-free."""
    title = "Fig. 6: the two streams of one restore"
    if df.empty or df.start_s.dropna().empty:
        return _empty(title, "no per-layer events recorded")
    df = _runs(df)
    present = set(df.groupby(["run", "variant"]).groups)
    keys = [(r, v) for r in dict.fromkeys(df.run) for v in dict.fromkeys(df.variant) if (r, v) in present]
    fig, axes = plt.subplots(len(keys), 1, figsize=(10, 1.2 + 2.1 * len(keys)), squeeze=False, layout="constrained")
    colors = {"recompute": "tab:blue", "load": "tab:orange", "h2d": "tab:orange", "place": "tab:brown"}
    first = {}
    for ax, (run, variant) in zip(axes[:, 0], keys):
        if run in first:  # one time axis per run: its variants side by side, runs at their own scale
            ax.sharex(first[run])
        first.setdefault(run, ax)
        d = df[(df.run == run) & (df.variant == variant)].dropna(subset=["start_s"])
        for k, (stream, s) in enumerate(d.groupby("stream")):
            ax.broken_barh(list(zip(s.start_s * 1e3, (s.end_s - s.start_s) * 1e3)), (k - 0.4, 0.8),
                           facecolors=colors.get(stream, "gray"), edgecolor="k", lw=0.2)
        streams = list(d.groupby("stream").groups)
        ax.set_yticks(range(len(streams)))
        ax.set_yticklabels(streams)
        ax.set_ylabel("stream")
        ax.grid(False, axis="y")
        r = d.recompute_ratio.iloc[0] if not d.empty else float("nan")
        extra = ""
        if "bubble_s" in d and d.bubble_s.notna().any():
            extra = f", idle inside streams {d.bubble_s.max() * 1e3:.1f} ms"
        if "single_stream" in d and bool(d.single_stream.fillna(False).any()):
            extra += " (single stream: the split recomputes nothing or loads nothing)"
        ax.set_title(f"{run}, {variant} split: recompute ratio {r:.2f}, restore {d.restore_s.max() * 1e3:.1f} ms"
                     f"{extra}", fontsize=9.5)
    for ax in axes[:, 0]:
        ax.set_xlabel("time since restore start (ms)")
    fig.suptitle(title, fontsize=TITLE_SIZE)
    return fig


# fig7's metrics: the panel title and the y label (with its unit) of each, and its scale to that unit
_FIG7_METRICS = {
    "prefill_s": ("prefill latency", "prefill time (s)", 1.0),
    "prefill_similarity_s": ("similarity maps during prefill", "estimator time (s)", 1.0),
    "decode_step_s": ("decode-step latency", "decode step time (s)", 1.0),
    "decode_similarity_s": ("similarity update per decode step", "estimator time (s)", 1.0),
    "map_bytes": ("memory of the similarity maps", "map memory (MB)", 1e-6),
}
_FIG7_MODES = {"estimator": "with estimator (krul)", "plain": "plain (no estimator)",
               "all maps": "all maps kept"}


def plot_fig7_estimator_overhead(df: pd.DataFrame):
    """Prefill and decode-step latency with/without the estimator, and map memory, vs seq length;
    one panel per (model, metric) with that metric's unit; median of the repeats, band min..max."""
    title = "Fig. 7: estimator overhead"
    if df.empty:
        return _empty(title)
    df = _runs(df)
    metrics = [m for m in _FIG7_METRICS if m in set(df.metric)]
    if not metrics:
        return _empty(title, "none of the estimator's metrics in these rows")
    keys = [(model, m) for model in df.model.unique() for m in metrics]
    ncols = min(3, len(keys))
    nrows = -(-len(keys) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(14, 3.6 * nrows), squeeze=False, layout="constrained")
    modes = list(dict.fromkeys(df["mode"]))
    runs = list(df.run.unique())
    for ax, (model, m) in zip(axes.flat, keys):
        name, ylabel, scale = _FIG7_METRICS[m]
        for r, run in enumerate(runs):
            for k, mode in enumerate(modes):
                s = df[(df.model == model) & (df.metric == m) & (df["mode"] == mode) & (df.run == run)]
                if s.empty:
                    continue
                g = (s.groupby("seq_len").value.agg(["median", "min", "max"]) * scale).sort_index()
                style = dict(_KRUL_STYLE) if mode == "estimator" else {
                    "color": sns.color_palette("tab10")[k % 10], "marker": "os^D"[k % 4], "zorder": 3}
                style["linestyle"] = _LINESTYLES[r % 4]
                label = _FIG7_MODES.get(mode, mode) + (f" ({run})" if len(runs) > 1 else "")
                ax.plot(g.index, g["median"], label=label, **style)
                ax.fill_between(g.index, g["min"], g["max"], color=style["color"], alpha=0.15, lw=0)
        ax.set_yscale("log")
        ax.set_xlabel(LABELS["seq_len"])
        ax.set_ylabel(ylabel)
        ax.set_title(f"{model}: {name}" if len(set(df.model)) > 1 else name, fontsize=10)
    for ax in axes.flat[len(keys):]:
        ax.set_axis_off()
    _dedup_legend(fig, axes.flat, loc="outside right upper", title="mode")
    fig.suptitle(title, fontsize=TITLE_SIZE)
    return fig


def plot_fig8_ablation(df: pd.DataFrame):
    """nll ratio to full-load (bootstrap CI; the plain nll when the rows carry no ratio) and stored
    bytes of krul and its ablations."""
    title = "Fig. 8: ablations"
    if df.empty:
        return _empty(title)
    df = _runs(df).copy()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    ratio = "nll_ratio" in df and df.nll_ratio.notna().any()
    y, lo, hi = ("nll_ratio", "nll_ratio_ci_lo", "nll_ratio_ci_hi") if ratio else ("nll", "nll_ci_lo", "nll_ci_hi")
    many = df.model.nunique() > 1 or df.run.nunique() > 1

    def names(d):
        return d.policy + (" | " + d.model + " | " + d.run if many else "")

    d = df.dropna(subset=[y]).reset_index(drop=True)
    for i, row in d.iterrows():
        axes[0].errorbar([i], [row[y]], yerr=[[max(row[y] - row[lo], 0)], [max(row[hi] - row[y], 0)]], capsize=3,
                         **{**_style(row.policy, i), "linestyle": "none"})
    axes[0].set_xticks(range(len(d)))
    axes[0].set_xticklabels(names(d), rotation=30, ha="right")
    if ratio:
        _full_load_line(axes[0])
        axes[0].axhline(1.01, color="#d62728", lw=0.8, ls=":", label="full-load + 1%")
        axes[0].legend(loc="upper left")
        axes[0].set_ylabel("nll ratio to full-load (x, 95% CI)")
        axes[0].set_title("reply nll relative to full-load", fontsize=10)
    else:
        axes[0].set_ylabel("reply nll (nats/token, 95% CI)")
        axes[0].set_title("reply nll", fontsize=10)
    axes[0].set_xlabel("policy")
    s = df.dropna(subset=["stored_bytes"]).reset_index(drop=True)
    axes[1].bar(range(len(s)), s.stored_bytes / 1e6, color=[_style(p, i)["color"] for i, p in enumerate(s.policy)],
                edgecolor=["k" if p == KRUL else "none" for p in s.policy], linewidth=1.5)
    if "full_kv_bytes" in s and s.full_kv_bytes.notna().any():
        axes[1].axhline(s.full_kv_bytes.max() / 1e6, color="0.4", ls="--", lw=1, label="full KV (bf16)")
        axes[1].legend(loc="lower right")
    axes[1].set_xticks(range(len(s)))
    axes[1].set_xticklabels(names(s), rotation=30, ha="right")
    axes[1].set_xlabel("policy")
    axes[1].set_ylabel(LABELS["stored_MB"])
    axes[1].set_title("stored KV", fontsize=10)
    fig.suptitle(title, fontsize=TITLE_SIZE)
    return fig


def plot_fig9_history_length(df: pd.DataFrame):
    """TTFT and stored bytes vs history length (500-4000) per policy; one column per (run, model)."""
    title = "Fig. 9: TTFT and storage vs history length"
    if df.empty or "ttft_s" not in df or df.ttft_s.dropna().empty:
        return _empty(title)
    df = _runs(df).copy()
    df["stored_MB"] = df.stored_bytes / 1e6
    keys = list(df.groupby(["run", "model"], sort=False).groups)
    fig, axes = plt.subplots(2, len(keys), figsize=(min(14, 1.8 + 5 * len(keys)), 7.4), squeeze=False,
                             layout="constrained")
    for j, (run, model) in enumerate(keys):
        d = df[(df.run == run) & (df.model == model)]
        for i, m in enumerate(("ttft_s", "stored_MB")):
            ax = axes[i, j]
            lo, hi = ("ttft_s_min", "ttft_s_max") if m == "ttft_s" else (None, None)
            _policy_lines(ax, d, "history_tokens", m, lo, hi, dodge=0.03)
            _log2_ticks(ax, d.history_tokens)
            if m == "ttft_s":
                ax.set_yscale("log")
            ax.set_xlabel(LABELS["history_tokens"])
            ax.set_ylabel(LABELS[m])
            ax.set_title(f"{run}, {model}", fontsize=10)
    _dedup_legend(fig, axes.flat, loc="outside right upper", title="policy")
    fig.suptitle(title, fontsize=TITLE_SIZE)
    _note(fig, "Points of a policy are shifted sideways by a few % so that equal values stay visible.")
    return fig


def plot_calibration_curves(record: dict, *more: dict):
    """nll ratio (paired 95% CI) against storage ratio (full KV / stored bytes, both priced at 2
    bytes per unquantized element, `pricing.storage_ratio`; records made before that pricing fall
    back to the measured compression ratio), one line per policy, from one or more
    `krul.calibrate.curves` records of the same model, split and conversations (a policy's points
    from several records join into one line). The x axis is logarithmic: the codec policies reach
    7x, the merge policies stay under 2x."""
    for other in more:
        if (other["model"], other["split"], other["conversations"]) != (
                record["model"], record["split"], record["conversations"]):
            raise ValueError("curve records to overlay must share model, split and conversations")
    def label(p):  # svd points run at a rank ratio: one line per (policy, rank ratio)
        return p["policy"] + (f" (rank {p['rank_ratio']:g})" if p.get("rank_ratio") is not None else "")

    points = [p for r in (record, *more) for p in r["points"]]
    x = "storage_ratio" if all(p.get("storage_ratio") for p in points) else "compression_ratio"
    lo, hi = min(p[x] for p in points), max(p[x] for p in points)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    for ax in axes:
        for k, name in enumerate(sorted(dict.fromkeys(label(p) for p in points), key=lambda n: n != KRUL)):
            pts = sorted((p for p in points if label(p) == name), key=lambda p: p[x])
            y = [p["nll_ratio"] for p in pts]
            err = [[p["nll_ratio"] - p["nll_ratio_lo"] for p in pts],
                   [p["nll_ratio_hi"] - p["nll_ratio"] for p in pts]]
            ax.errorbar([p[x] for p in pts], y, yerr=err, capsize=3, label=name,
                        **_style(name.split(" (rank")[0], k))
        _full_load_line(ax, label="full-load (full KV)")
        ax.axhline(1.01, color="grey", ls="--", lw=1, label="full KV + 1%")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(mticker.NullFormatter())
        ax.set_xticks([t for t in (1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 7, 10) if lo / 1.1 <= t <= hi * 1.1])
        ax.set_xlabel("storage ratio (full KV / stored bytes, at 2 bytes per element; log)" if x == "storage_ratio"
                      else "compression ratio of loaded KV (x, measured)")
        ax.set_ylabel(LABELS["nll_ratio"])
    axes[0].set_title("all measured points", fontsize=9)
    # the zoom: where the 1% bar decides (points above it are clipped, their lines run off the top)
    axes[1].set_ylim(0.99, 1.04)
    axes[1].set_title("zoom on nll ratio 0.99-1.04: the 1% bar", fontsize=9)
    fig.suptitle(f"{record['model']}, {record['split']}: {len(record['conversations'])} conversations, "
                 f"recompute 0; 95% paired bootstrap intervals", fontsize=TITLE_SIZE)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8, title="policy")
    return fig


def plot_fig10_throughput(df: pd.DataFrame):
    """Throughput and TTFT per policy under the trace, as ratios to full-recompute of the same trace
    (its line at 1.0); one column per (run, budget setting), rows: throughput (prefill tokens/s with
    the restored history counted as prefill, turns/s; higher is better), then TTFT p50/p95/p99 from
    each turn's due time (lower is better). The krul-family policy (column `role`) is drawn in
    krul's look, on top."""
    title = "Fig. 10: throughput and TTFT under a ShareGPT multi-turn trace"
    need = "prefill_tokens_per_s_vs_full_recompute"
    if df.empty or need not in df or df[need].dropna().empty:
        return _empty(title, "no trace with full-recompute in this run: nothing to compare against")
    df = _runs(df).copy()
    if "budget_set" not in df:
        df["budget_set"] = "-"
    keys = list(df.groupby(["run", "budget_set"], sort=False).groups)
    panels = [("throughput", [("prefill_tokens_per_s_vs_full_recompute", "prefill\n(tokens/s)"),
                              ("turns_per_s_vs_full_recompute", "turns\n(turns/s)")],
               "throughput ratio to\nfull-recompute (x, higher: better)", "throughput measure"),
              ("ttft", [(f"ttft_{p}_vs_full_recompute", p) for p in ("p50", "p95", "p99")],
               "TTFT ratio to\nfull-recompute (x, lower: better)", "TTFT percentile (from each turn's due time)")]
    # at most three (run, budget setting) columns side by side; more go on further pairs of rows
    ncols = min(3, len(keys))
    groups = -(-len(keys) // ncols)
    fig, grid = plt.subplots(2 * groups, ncols, figsize=(4.0 * ncols + 2.4, 7.0 * groups), squeeze=False,
                             layout="constrained")
    for extra in range(len(keys), groups * ncols):  # the last group's empty cells
        grid[2 * (extra // ncols), extra % ncols].set_visible(False)
        grid[2 * (extra // ncols) + 1, extra % ncols].set_visible(False)
    used = []
    for i, (run, budget_set) in enumerate(keys):
        axes = grid[2 * (i // ncols):2 * (i // ncols) + 2]
        col = i % ncols
        used += [axes[0, col], axes[1, col]]
        d = df[(df.run == run) & (df.budget_set == budget_set)]
        krul_family = set(d.policy[d.role == "krul-family"]) if "role" in d else {KRUL}
        pols = sorted(dict.fromkeys(map(str, d.policy)), key=lambda p: p not in krul_family)
        centre = (len(pols) - 1) / 2
        for j, (_, cols, ylabel, xlabel) in enumerate(panels):
            ax = axes[j, col]
            ax.axhline(1.0, label="full-recompute (reference, 1.0)", color="#1f77b4", lw=1.0, ls="-", zorder=2)
            for k, pol in enumerate(pols):
                g = d[d.policy == pol]
                ys = [float(g[c].median()) if c in g and g[c].notna().any() else np.nan for c, _ in cols]
                xs = np.arange(len(cols)) + 0.06 * (k - centre)
                style = dict(_KRUL_STYLE) if pol in krul_family else _style(pol, k)
                if j == 0:  # two different measures: no line between them
                    style["linestyle"] = "none"
                ax.plot(xs, ys, label=pol, **style)
            ax.set_xticks(np.arange(len(cols)))
            ax.set_xticklabels([lab for _, lab in cols])
            ax.set_xlim(-0.5, len(cols) - 0.5)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{run}, {budget_set} budgets", fontsize=9.5)
        base = d[d.policy == "full-recompute"]
        if not base.empty and {"prefill_tokens_per_s", "ttft_p50_s"} <= set(base):
            b = base.iloc[0]
            axes[0, col].set_title(f"{run}, {budget_set} budgets\nfull-recompute: {b.prefill_tokens_per_s:.0f} "
                                   f"prefill tokens/s, TTFT p50 {b.ttft_p50_s:.2f} s", fontsize=9.5)
    _dedup_legend(fig, used[1::2] + used[0::2], loc="outside right center", title="policy")
    fig.suptitle(title, fontsize=TITLE_SIZE)
    _note(fig, "Ratios to full-recompute measured in the same trace (the line at 1.0).\nPrefill tokens: every "
               "turn's restored history plus its new input. Points shifted sideways to keep equal values visible.")
    return fig
