"""Figure 10: prefill throughput and TTFT under a ShareGPT multi-turn trace (the paper's 2.5x).

`run` replays one `krul.trace` trace (N ShareGPT conversations as concurrent sessions over one model
and one tiered store) with every policy of the YAML side by side, once per budget setting of the
YAML's `budget_sets` (say the default budgets, and budgets small enough to force demotion and
deletion). One row per (budget setting, policy): throughput (prefill tokens/s, where the restored
history counts as prefill, and turns/s), TTFT p50/p95/p99 from the turn's due time (queueing
included), each also as a ratio to full-recompute of the same trace, and the store's counts (hit
rates per tier, evictions, demotions, deletions, fallbacks, spot-check mismatches). Each budget
setting's whole trace report (per-turn rows, provenance) is written to `<out_dir>/trace-<name>.json`.

`claim` is the krul-family policy's prefill throughput over the strongest baseline's (the largest of
the claim's `baselines`: full-recompute, full-load and cake), the smallest over budget settings: any
one baseline can fail it. The paper's own ratio (over full-recompute) is in the rows
(`prefill_tokens_per_s_vs_full_recompute`).
"""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pandas as pd

from krul.figures.common import ExperimentError, PartialResults, get_adapter, progress

METRIC = "krul_over_best_baseline_prefill_throughput"  # the name experiments/fig10_throughput.yaml gives `claim`

_PERCENTILES = ("p50", "p95", "p99")


def _trace_config(cfg: dict, budgets: str):
    from krul.trace import TraceConfig

    known = {f.name for f in fields(TraceConfig)}
    settings = dict(cfg.get("trace") or {})
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ExperimentError(f"fig10_throughput: unknown trace setting(s) {', '.join(unknown)}; known: "
                              f"{', '.join(sorted(known))}")
    settings.update(model=cfg["model"], policies=tuple(cfg["policies"]), budgets=budgets,
                    device=cfg.get("device", "cpu"), seed=int(cfg.get("seed", 0)))
    return TraceConfig(**settings).check()


def rows_of(report: dict, budget_set: str, krul_policy: str) -> list[dict]:
    """One row per policy of a `krul.trace` report (the tidy frame's columns)."""
    out = []
    for r in report["policies"]:
        vs = r.get("vs_full_recompute") or {}
        row = {"budget_set": budget_set, "budgets": report["provenance"]["config"]["budgets"],
               "model": report["provenance"]["model"], "policy": r["policy"],
               "role": "krul-family" if r["policy"] == krul_policy else "baseline", "lossless": r["lossless"],
               "conversations": r["conversations"], "turns": r["turns"], "turns_planned": r["turns_planned"],
               "lost_conversations": r["lost_conversations"], "wall_s": r["wall_s"],
               "turns_per_s": r["turns_per_s"], "prefill_tokens": r["prefill_tokens"],
               "restored_history_tokens": r["restored_history_tokens"],
               "prefill_tokens_per_s": r["prefill_tokens_per_s"]}
        for p in _PERCENTILES:
            row[f"ttft_{p}_s"] = r["ttft_s"][p]
        for p in _PERCENTILES:
            row[f"engine_ttft_{p}_s"] = r["engine_ttft_s"][p]
        row["turns_per_s_vs_full_recompute"] = vs.get("turns_per_s")
        row["prefill_tokens_per_s_vs_full_recompute"] = vs.get("prefill_tokens_per_s")
        for p in _PERCENTILES:
            row[f"ttft_{p}_vs_full_recompute"] = vs.get(f"ttft_s_{p}")
        for tier, t in (r.get("tiers") or {}).items():
            row[f"hit_rate_{tier}"] = t.get("hit_rate")
            row[f"peak_bytes_{tier}"] = t.get("peak_bytes")
        row.update({k: r[k] for k in ("restores", "fallbacks", "evictions", "demotions", "deletions", "dropped",
                                      "spot_turns", "spot_mismatches")})
        out.append(row)
    return out


def run(cfg: dict) -> pd.DataFrame:
    """The trace under each budget setting, every policy side by side; one row per (setting, policy)."""
    from krul.data import load_conversations
    from krul.trace import run_trace

    budget_sets = cfg.get("budget_sets") or {}
    if not budget_sets:
        raise ExperimentError("fig10_throughput: `budget_sets` is empty; give at least one NAME: BUDGETS")
    configs = {name: _trace_config(cfg, budgets) for name, budgets in budget_sets.items()}  # all checked first
    krul_policy = (cfg.get("claim") or {}).get("policy", "krul")
    cache = PartialResults(cfg["out_dir"], "fig10_throughput", cfg)
    adapter, convs = None, None
    rows = []
    for name, tcfg in progress(configs.items(), "fig10 traces", total=len(configs)):
        key = f"{cfg['model']}|{name}|{tcfg.budgets}"
        if key not in cache:
            if adapter is None:
                adapter = get_adapter(cfg["model"], cfg.get("device", "cpu"))
                convs = load_conversations(tcfg.data, split=None if tcfg.split == "all" else tcfg.split,
                                           limit=tcfg.n_conversations)
            report = run_trace(adapter, convs, tcfg, progress=False)
            path = Path(cfg["out_dir"]) / f"trace-{name}.json"
            path.write_text(json.dumps(report, indent=1, default=str) + "\n")
            cache.add(key, rows_of(report, name, krul_policy))
        rows += cache.get(key)
    return pd.DataFrame(rows)


def claim(df: pd.DataFrame, cfg: dict):
    """min over budget settings of prefill tokens/s(krul-family) / max over the claim's baselines
    present of prefill tokens/s: >= 1 means the krul-family policy served the trace's prefill at least
    as fast as every baseline under every budget setting."""
    c = cfg["claim"]
    policy = c.get("policy", "krul")
    rivals = c.get("baselines", ["full-recompute", "full-load", "cake"])
    ratios = []
    for _, d in df.groupby("budget_set") if "budget_set" in df else [("-", df)]:
        tput = d.groupby("policy").prefill_tokens_per_s.median()
        present = [b for b in rivals if b in tput and pd.notna(tput[b])]
        if policy not in tput or not present or pd.isna(tput[policy]):
            continue
        ratios.append(float(tput[policy] / max(tput[b] for b in present)))
    return min(ratios) if ratios else None
