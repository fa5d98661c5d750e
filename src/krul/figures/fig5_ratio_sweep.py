"""Figure 5: TTFT vs the recompute ratio, and the scheduler's choice.

`run` sweeps flat recompute/load splits of one stored state per history length, then times every
swept split and the scheduler's in one interleaved pass; `claim` is the scheduler's regret (its
restore time over the best swept one's), the largest over lengths.
"""
from __future__ import annotations

import statistics

import pandas as pd

from krul.figures.common import MissingComponent, get_adapter, progress
from krul.figures.timing import history_ids, prefill_kv, rates_or_fit, time_restore

METRIC = "scheduler_regret"  # the name experiments/fig5_ratio_sweep.yaml gives `claim`


def run(cfg: dict) -> pd.DataFrame:
    """TTFT vs the recompute ratio r (flat split, no compression) and the scheduler's choice."""
    from krul import scheduler
    from krul.policies import get_policy
    from krul.store import build_state, make_store

    # the scheduler as krul runs it: a split must promise min_gain over one stream (policies._MIN_GAIN)
    min_gain = float(cfg.get("min_gain", get_policy("krul").min_gain))
    rows = []
    for model in cfg["models"]:
        adapter = get_adapter(model, cfg["device"])
        for n in cfg["history_tokens"]:
            ids = history_ids(adapter, n + cfg["new_input_tokens"])
            hist, new = ids[:n], ids[n:n + cfg["new_input_tokens"]]
            kv = prefill_kv(adapter, hist)
            store = make_store(cfg.get("tier", "pageable"))
            import torch

            ends = {}
            for r in progress(cfg["ratios"], f"{model} n={n}"):
                split = scheduler.fixed_split(n, adapter.n_layers, r, slope=cfg.get("slope", 0.0))
                store.put("s", build_state(adapter.fingerprint(), torch.tensor(hist), kv, split.lengths, None))
                for rep, t in enumerate(time_restore(adapter, store, "s", new, cfg.get("repeats", 1))):
                    rows.append({"model": model, "history_tokens": n, "kind": "sweep", "recompute_ratio": r,
                                 "rep": rep, "restore_s": t["restore_s"], "ttft_s": t["ttft_s"],
                                 "recompute_s": t["report"].recompute_s, "load_s": t["report"].load_s})
                    ends.setdefault(r, []).append(t["report"])
            fitted = None
            if 0.0 in ends and 1.0 in ends:
                rec = statistics.median(x.recompute_s for x in ends[1.0])
                load = statistics.median(x.load_s for x in ends[0.0])
                nbytes = n * adapter.n_layers * adapter.layer_kv_bytes_per_token()
                fitted = scheduler.RestoreRates(recompute_s_per_token=rec / (n * adapter.n_layers),
                                                load_bytes_per_s=nbytes / max(load, 1e-9))
            try:
                rates, source = rates_or_fit(adapter, cfg.get("tier", "pageable"), fitted)
            except MissingComponent as e:
                print(f"scheduler choice not measured: {e}")
                continue
            choice = scheduler.choose_split(n, adapter.n_layers, rates, adapter.layer_kv_bytes_per_token(),
                                            slope=cfg.get("slope", 0.0), min_gain=min_gain)
            # the regret's two sides measured side by side: every swept ratio and the scheduler's split
            # stored at once and timed round-robin, so drift and noise fall on all of them alike
            splits = {("sweep", r): scheduler.fixed_split(n, adapter.n_layers, r, slope=cfg.get("slope", 0.0))
                      for r in cfg["ratios"]}
            splits[("scheduler", choice.recompute_ratio)] = choice
            for (kind, r), split in splits.items():
                store.put(f"{kind}-{r}", build_state(adapter.fingerprint(), torch.tensor(hist), kv,
                                                     split.lengths, None))
                time_restore(adapter, store, f"{kind}-{r}", new, 0)  # warm-up
            for rep in range(cfg.get("repeats", 1)):
                for (kind, r), split in splits.items():
                    t = time_restore(adapter, store, f"{kind}-{r}", new, 1, warmup=0)[0]
                    rows.append({"model": model, "history_tokens": n, "kind": kind, "pass": "interleaved",
                                 "recompute_ratio": r, "rep": rep, "restore_s": t["restore_s"],
                                 "ttft_s": t["ttft_s"], "recompute_s": t["report"].recompute_s,
                                 "load_s": t["report"].load_s,
                                 "predicted_s": choice.t_restore_s if kind == "scheduler" else None,
                                 "rates_source": source if kind == "scheduler" else None})
            for (kind, r) in splits:
                store.delete(f"{kind}-{r}")
    return pd.DataFrame(rows)


def claim(df, cfg):
    """The scheduler's regret at each length, the largest over lengths: restore time at its split /
    the best swept ratio's, both medians of the interleaved pass (measured side by side); runs that
    predate the interleaved pass compare the sweep with the scheduler's later repeats."""
    if "pass" in df and (df["pass"] == "interleaved").any():
        df = df[df["pass"] == "interleaved"]
    regrets = []
    for _, g in df.groupby("history_tokens"):
        d, ch = g[g.kind == "sweep"], g[g.kind == "scheduler"]
        if d.empty or ch.empty:
            continue
        # restore time: the only part the split changes (the new-input prefill is the same for all)
        regrets.append(float(ch.restore_s.median() / d.groupby("recompute_ratio").restore_s.median().min()))
    return max(regrets) if regrets else None
