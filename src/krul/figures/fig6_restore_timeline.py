"""Figure 6: per-layer timeline of the two restore streams, fixed split vs bubble-free.

`run` restores one state whose deeper layers are merged in pairs under a fixed ratio and under the
scheduler's bubble-free split and lists each layer's recompute and load events; `claim` is restore
time fixed / bubble-free.
"""
from __future__ import annotations

import pandas as pd

from krul.figures.common import get_adapter
from krul.figures.timing import history_ids, prefill_kv, rates_or_fit, time_restore

METRIC = "fixed_over_bubble_free"  # the name experiments/fig6_restore_timeline.yaml gives `claim`


def run(cfg: dict) -> pd.DataFrame:
    """Per-layer events of the two streams of one restore: fixed ratio vs the bubble-free split,
    both over a state whose deeper layers are merged in pairs (unequal per-layer load bytes)."""
    import torch

    from krul import scheduler
    from krul.pricing import PlanPricing
    from krul.selector import MiniCacheSelector, SelectionInput
    from krul.store import build_state, make_store

    model, n, tier = cfg["model"], cfg["history_tokens"], cfg.get("tier", "pageable")
    adapter = get_adapter(model, cfg["device"])
    ids = history_ids(adapter, n + cfg["new_input_tokens"])
    hist, new = ids[:n], ids[n:n + cfg["new_input_tokens"]]
    kv = prefill_kv(adapter, hist)
    L = adapter.n_layers
    lb = float(adapter.layer_kv_bytes_per_token())
    plan = MiniCacheSelector(target_ratio=cfg.get("target_ratio", 1.5)).select(
        SelectionInput(distances=torch.zeros(L, L, dtype=torch.float64), boundary_ratio=torch.ones(L, dtype=torch.float64),
                       n_layers=L, layer_bytes_per_token=lb))
    retain = cfg.get("retain_ratio", 0.05)
    per_token = [b / n for b in PlanPricing.for_adapter(adapter, n, plan, {"retain_ratio": retain}).layer_bytes([0] * L)]
    store = make_store(tier)
    # endpoints measured here give the fallback rates when krul.profile is absent
    fitted = None
    ends = {}
    for r in (0.0, 1.0):
        split = scheduler.fixed_split(n, L, r)
        store.put("s", build_state(adapter.fingerprint(), torch.tensor(hist), kv, split.lengths, None,
                                   pairs=plan.pairs, compress_kwargs={"retain_ratio": retain}))
        ends[r] = time_restore(adapter, store, "s", new, 1)[0]["report"]
    fitted = scheduler.RestoreRates(recompute_s_per_token=ends[1.0].recompute_s / (n * L),
                                    load_bytes_per_s=max(ends[0.0].loaded_bytes, 1) / max(ends[0.0].load_s, 1e-9))
    rates, source = rates_or_fit(adapter, tier, fitted)
    splits = {"fixed": scheduler.fixed_split(n, L, cfg.get("fixed_ratio", 0.4), slope=cfg.get("slope", 1.0)),
              "bubble-free": scheduler.choose_split(n, L, rates, per_token, slope=cfg.get("slope", 1.0))}
    rows = []
    for variant, split in splits.items():
        store.put("s", build_state(adapter.fingerprint(), torch.tensor(hist), kv, split.lengths, None,
                                   pairs=plan.pairs, compress_kwargs={"retain_ratio": retain}))
        timed = time_restore(adapter, store, "s", new, cfg.get("repeats", 1), timeline=True)
        best = min(timed, key=lambda t: t["report"].restore_s)
        rep = best["report"]
        for ev in rep.events:
            stream, layer_idx, s0, s1 = ev[:4]  # milliseconds from the restore's start
            rows.append({"model": model, "variant": variant, "stream": stream, "layer_idx": layer_idx,
                         "start_s": s0 / 1e3, "end_s": s1 / 1e3, "restore_s": rep.restore_s, "recompute_s": rep.recompute_s,
                         "load_s": rep.load_s, "recompute_ratio": split.recompute_ratio,
                         "history_tokens": n, "rates_source": source})
        if not rep.events:  # no per-layer events on this device: one bar per stream
            for stream, t in (("recompute", rep.recompute_s), ("load", rep.load_s)):
                rows.append({"model": model, "variant": variant, "stream": stream, "layer_idx": -1,
                             "start_s": 0.0, "end_s": t, "restore_s": rep.restore_s,
                             "recompute_s": rep.recompute_s, "load_s": rep.load_s,
                             "recompute_ratio": split.recompute_ratio, "history_tokens": n,
                             "rates_source": source})
    return with_bubbles(pd.DataFrame(rows))


def stream_bubbles(events: pd.DataFrame) -> dict[str, float]:
    """Per stream, its idle time between its first event's start and its last event's end: that
    span minus the union of its events (seconds). A stream with no events has none."""
    out = {}
    for stream, ev in events.groupby("stream"):
        spans = sorted(zip(ev.start_s, ev.end_s))
        busy, cur_s, cur_e = 0.0, None, None
        for s0, s1 in spans:
            if cur_e is None or s0 > cur_e:
                busy += 0.0 if cur_e is None else cur_e - cur_s
                cur_s, cur_e = s0, s1
            else:
                cur_e = max(cur_e, s1)
        busy += cur_e - cur_s
        out[stream] = max(0.0, max(e for _, e in spans) - min(a for a, _ in spans) - busy)
    return out


def with_bubbles(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with, per variant, `bubble_s` (the summed idle time of its streams, `stream_bubbles`)
    and `single_stream` (the split recomputes nothing or loads nothing: one stream, no balance to
    strike, which the figure then says)."""
    if df.empty:
        return df
    df = df.copy()
    for variant, d in df.groupby("variant"):
        per_layer = d[d.layer_idx >= 0]
        df.loc[df.variant == variant, "bubble_s"] = sum(stream_bubbles(per_layer).values()) if len(per_layer) else None
        ratio = float(d.recompute_ratio.iloc[0])
        df.loc[df.variant == variant, "single_stream"] = ratio <= 0.0 or ratio >= 1.0
    return df


def claim(df, cfg):
    """Restore time of the fixed split over the bubble-free one (each its fastest repeat, as `run` records it)."""
    t = df.groupby("variant").restore_s.max()
    if "fixed" not in t or "bubble-free" not in t:
        return None
    return float(t["fixed"] / t["bubble-free"])
