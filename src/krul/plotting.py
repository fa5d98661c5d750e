"""One `plot_<slug>(df) -> matplotlib Figure` per figure, from the tidy DataFrames of `experiments`.

Every function accepts the rows of several runs at once (column `run`, e.g. `cpu-default` and a
committed `h100-full` reference) and draws them together; it draws an explanatory empty panel when
there is nothing to draw. This module computes no measurements and knows no paths.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
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


def plot_fig1_similarity_variability(df: pd.DataFrame):
    """Left: mean layer-pair distance; middle: spread (CV) of each pair over conversations;
    right: Jaccard overlap of the selected pairs between conversations."""
    title = "Fig. 1: attention similarity varies across conversations"
    if df.empty:
        return _empty(title)
    df = _runs(df)
    models = list(df.model.unique())
    fig, axes = plt.subplots(len(models), 3, figsize=(14, 4 * len(models)), squeeze=False)
    for row, model in zip(axes, models):
        g = df[df.model == model]
        n = int(max(g.layer_a.max(), g.layer_b.max())) + 1
        mean = g.groupby(["layer_a", "layer_b"]).distance.mean()
        cv = g.groupby(["layer_a", "layer_b"]).distance.agg(lambda x: x.std(ddof=0) / x.mean() if x.mean() else 0)
        for ax, series, name in ((row[0], mean, "mean distance"), (row[1], cv, "spread across conversations (CV)")):
            m = np.full((n, n), np.nan)
            for (a, b), v in series.items():
                m[a, b] = m[b, a] = v
            sns.heatmap(m, ax=ax, cmap="viridis", square=True, cbar_kws={"shrink": 0.7})
            ax.set_title(f"{model}: {name}")
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
                    xticklabels=False, yticklabels=False, cbar_kws={"shrink": 0.7})
        off = jac[~np.eye(len(ids), dtype=bool)]
        row[2].set_title(f"{model}: Jaccard of selected pairs (mean {off.mean() if off.size else float('nan'):.2f})")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_fig2_ttft(df: pd.DataFrame):
    """TTFT and restore time per policy vs history length; one column per (run, model, tier)."""
    title = "Fig. 2: TTFT per policy across history lengths and tiers"
    if df.empty or "ttft_s" not in df or df.ttft_s.dropna().empty:
        return _empty(title)
    df = _runs(df).copy()
    df["panel"] = df.run.astype(str) + " | " + df.model.astype(str) + " | " + df.tier.astype(str)
    long = df.melt(id_vars=["panel", "policy", "history_tokens"], value_vars=[c for c in ("ttft_s", "restore_s") if c in df],
                   var_name="metric", value_name="seconds")
    g = sns.relplot(data=long, x="history_tokens", y="seconds", hue="policy", style="policy", col="panel",
                    row="metric", kind="line", marker="o", facet_kws={"sharey": False}, height=3, aspect=1.2,
                    errorbar=("pi", 100))
    g.set(yscale="log")
    g.set_titles("{row_name}\n{col_name}", size=9)
    g.figure.suptitle(title, y=1.04)
    return g.figure


def plot_fig3_storage(df: pd.DataFrame):
    """Stored bytes per policy and model vs history length (full KV dashed)."""
    title = "Fig. 3: KV storage per policy"
    if df.empty:
        return _empty(title)
    df = _runs(df).copy()
    df["stored_MB"] = df.stored_bytes / 1e6
    g = sns.relplot(data=df, x="history_tokens", y="stored_MB", hue="policy", style="run", col="model",
                    kind="line", marker="o", facet_kws={"sharey": False, "sharex": False}, height=3.5,
                    errorbar=None)
    for ax, model in zip(g.axes.flat, g.col_names):
        d = df[df.model == model].sort_values("history_tokens")
        ax.plot(d.history_tokens, d.full_kv_bytes / 1e6, "k--", lw=0.8, label="full KV")
        ax.set_ylabel("stored MB")
    g.figure.suptitle(title, y=1.03)
    return g.figure


def plot_fig4_accuracy(df: pd.DataFrame):
    """nll ratio to full-load (paired bootstrap CI), greedy agreement (bootstrap CI), ROUGE-L."""
    title = "Fig. 4: quality per policy"
    if df.empty:
        return _empty(title)
    df = _runs(df).copy()
    df["setting"] = df.model + " | " + df.dataset
    if df.run.nunique() > 1:  # this run beside committed references: one bar group per run
        df["setting"] = df.run.astype(str) + " | " + df.setting
    df = df.drop_duplicates(["setting", "policy"], keep="last")
    panels = [("nll_ratio", "nll_ratio_ci_lo", "nll_ratio_ci_hi", "nll / nll(full-load)"),
              ("greedy_match_rate", "greedy_ci_lo", "greedy_ci_hi", "greedy agreement (32 tok)"),
              ("rougeL_vs_full_load", None, None, "ROUGE-L vs full-load"),
              ("rougeL_vs_reference", None, None, "ROUGE-L vs GPT-4 ref (MT-Bench)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    settings = sorted(df.setting.unique())
    policies = list(dict.fromkeys(df.policy))
    width = 0.8 / max(1, len(policies))
    for ax, (col, lo, hi, label) in zip(axes, panels):
        for k, pol in enumerate(policies):
            d = df[df.policy == pol].set_index("setting").reindex(settings)
            x = np.arange(len(settings)) + k * width
            y = pd.to_numeric(d[col], errors="coerce")
            err = None
            if lo and hi:
                err = np.vstack([(y - pd.to_numeric(d[lo], errors="coerce")).clip(lower=0).fillna(0),
                                 (pd.to_numeric(d[hi], errors="coerce") - y).clip(lower=0).fillna(0)])
            ax.bar(x, y, width, yerr=err, label=pol, capsize=2)
        ax.set_xticks(np.arange(len(settings)) + 0.4 - width / 2)
        ax.set_xticklabels(settings, rotation=30, ha="right", fontsize=7)
        ax.set_title(label)
        if col == "nll_ratio":
            ax.axhline(1.0, color="k", lw=0.8)
            ax.axhline(1.01, color="r", lw=0.8, ls=":")
            finite = pd.to_numeric(df[col], errors="coerce").dropna()
            if not finite.empty:
                ax.set_ylim(min(0.98, finite.min() - 0.01), max(1.05, finite.max() + 0.02))
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_fig5_ratio_sweep(df: pd.DataFrame):
    """TTFT vs recompute ratio; the scheduler's choice as a star."""
    title = "Fig. 5: TTFT vs recompute:load ratio"
    if df.empty:
        return _empty(title)
    df = _runs(df)
    sweep, choice = df[df.kind == "sweep"], df[df.kind == "scheduler"]
    g = sns.relplot(data=sweep, x="recompute_ratio", y="ttft_s", hue="history_tokens", style="run", col="model",
                    kind="line", marker="o", height=3.5, facet_kws={"sharey": False}, palette="viridis")
    for ax, model in zip(g.axes.flat, g.col_names):
        c = choice[choice.model == model].groupby(["run", "history_tokens"]).agg(
            r=("recompute_ratio", "first"), t=("ttft_s", "median")).reset_index()
        ax.scatter(c.r, c.t, marker="*", s=160, color="red", zorder=5, label="scheduler's choice")
        ax.legend(fontsize=7)
    g.figure.suptitle(title, y=1.03)
    return g.figure


def plot_fig6_restore_timeline(df: pd.DataFrame):
    """Per-layer bars of the recompute and load streams of one restore, fixed vs bubble-free."""
    title = "Fig. 6: the two streams of one restore"
    if df.empty or df.start_s.dropna().empty:
        return _empty(title, "no per-layer events recorded")
    df = _runs(df)
    keys = list(df.groupby(["run", "variant"]).groups)
    fig, axes = plt.subplots(len(keys), 1, figsize=(9, 2.2 * len(keys)), sharex=True, squeeze=False)
    colors = {"recompute": "tab:blue", "load": "tab:orange"}
    for ax, (run, variant) in zip(axes[:, 0], keys):
        d = df[(df.run == run) & (df.variant == variant)].dropna(subset=["start_s"])
        for k, (stream, s) in enumerate(d.groupby("stream")):
            ax.broken_barh(list(zip(s.start_s * 1e3, (s.end_s - s.start_s) * 1e3)), (k - 0.4, 0.8),
                           facecolors=colors.get(stream, "gray"), edgecolor="k", lw=0.2)
        streams = list(d.groupby("stream").groups)
        ax.set_yticks(range(len(streams)))
        ax.set_yticklabels(streams)
        r = d.recompute_ratio.iloc[0] if not d.empty else float("nan")
        extra = ""
        if "bubble_s" in d and d.bubble_s.notna().any():
            extra = f", idle inside streams {d.bubble_s.max() * 1e3:.1f} ms"
        if "single_stream" in d and bool(d.single_stream.fillna(False).any()):
            extra += " (single stream: the split recomputes nothing or loads nothing)"
        ax.set_title(f"{run} | {variant}: r={r:.2f}, restore {d.restore_s.max() * 1e3:.1f} ms{extra}", fontsize=9)
    axes[-1, 0].set_xlabel("ms since restore start")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_fig7_estimator_overhead(df: pd.DataFrame):
    """Prefill and decode-step latency with/without the estimator, and map memory, vs seq length."""
    title = "Fig. 7: estimator overhead"
    if df.empty:
        return _empty(title)
    df = _runs(df)
    metrics = [m for m in ("prefill_s", "prefill_similarity_s", "decode_step_s", "decode_similarity_s", "map_bytes") if m in set(df.metric)]
    g = sns.relplot(data=df[df.metric.isin(metrics)], x="seq_len", y="value", hue="mode", style="run",
                    col="metric", row="model", kind="line", marker="o", height=3, facet_kws={"sharey": False},
                    col_order=metrics)
    for ax in g.axes.flat:
        ax.set_yscale("log")
    g.figure.suptitle(title, y=1.03)
    return g.figure


def plot_fig8_ablation(df: pd.DataFrame):
    """nll (bootstrap CI) and stored bytes of krul and its ablations."""
    title = "Fig. 8: ablations"
    if df.empty:
        return _empty(title)
    df = _runs(df).copy()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    d = df.dropna(subset=["nll"])
    x = np.arange(len(d))
    axes[0].errorbar(x, d.nll, yerr=[(d.nll - d.nll_ci_lo).clip(lower=0), (d.nll_ci_hi - d.nll).clip(lower=0)],
                     fmt="o", capsize=3)
    axes[0].set_xticks(x)
    axes[0].set_xticklabels(d.policy + " | " + d.model + " | " + d.run, rotation=30, ha="right", fontsize=7)
    axes[0].set_ylabel("reply nll (95% bootstrap CI)")
    df["stored_MB"] = df.stored_bytes / 1e6
    sns.barplot(data=df, x="policy", y="stored_MB", hue="model", ax=axes[1], errorbar=None)
    axes[1].tick_params(axis="x", rotation=30)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_fig9_history_length(df: pd.DataFrame):
    """TTFT and stored bytes vs history length (500-4000) per policy."""
    title = "Fig. 9: TTFT and storage vs history length"
    if df.empty or "ttft_s" not in df or df.ttft_s.dropna().empty:
        return _empty(title)
    df = _runs(df).copy()
    df["stored_MB"] = df.stored_bytes / 1e6
    long = df.melt(id_vars=["run", "model", "policy", "history_tokens"], value_vars=["ttft_s", "stored_MB"],
                   var_name="metric", value_name="value")
    long["panel"] = long.run + " | " + long.model
    g = sns.relplot(data=long, x="history_tokens", y="value", hue="policy", style="policy", row="metric",
                    col="panel", kind="line", marker="o", height=3, facet_kws={"sharey": False}, errorbar=None)
    g.figure.suptitle(title, y=1.02)
    return g.figure


def plot_calibration_curves(record: dict, *more: dict):
    """nll ratio (paired 95% CI) against measured compression ratio, one line per policy, from one
    or more `krul.calibrate.curves` records of the same model, split and conversations (a policy's
    points from several records join into one line)."""
    for other in more:
        if (other["model"], other["split"], other["conversations"]) != (
                record["model"], record["split"], record["conversations"]):
            raise ValueError("curve records to overlay must share model, split and conversations")
    def label(p):  # svd points run at a rank ratio: one line per (policy, rank ratio)
        return p["policy"] + (f" (rank {p['rank_ratio']:g})" if p.get("rank_ratio") is not None else "")

    points = [p for r in (record, *more) for p in r["points"]]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name in dict.fromkeys(label(p) for p in points):
        pts = sorted((p for p in points if label(p) == name), key=lambda p: p["compression_ratio"])
        y = [p["nll_ratio"] for p in pts]
        err = [[p["nll_ratio"] - p["nll_ratio_lo"] for p in pts], [p["nll_ratio_hi"] - p["nll_ratio"] for p in pts]]
        ax.errorbar([p["compression_ratio"] for p in pts], y, yerr=err, marker="o", capsize=3, label=name)
    ax.axhline(1.01, color="grey", ls="--", lw=1, label="full KV + 1%")
    ax.set_xlabel("compression ratio of loaded KV (measured)")
    ax.set_ylabel("reply nll / full-KV nll")
    ax.set_title(f"{record['model']}, {record['split']}: {len(record['conversations'])} conversations, "
                 f"recompute 0", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
