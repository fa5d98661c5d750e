"""Restore timing shared by the timing figures: the bench's TTFT rows (fig2, fig9) and one stored
state's restore timed by hand (fig5, fig6), with the rates the scheduler plans from.

Knows nothing about any figure's sweep or claim.
"""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from krul.figures.common import ExperimentError, MissingComponent, get_rates, select_conversations


def run_bench(cfg: dict) -> pd.DataFrame:
    """Rows of `krul.bench.run_ttft(cfg["bench"])` (its own warm-up, repeats and hardware record)."""
    try:
        from krul import bench
    except ImportError as e:
        raise MissingComponent(f"krul.bench is not available ({e})") from None
    bcfg = dict(cfg["bench"])
    bcfg.setdefault("device", cfg["device"])
    bcfg.setdefault("seed", cfg["seed"])
    out = Path(cfg["out_dir"]) / "partial" / "bench.csv"  # the bench appends rows and skips done ones
    out.parent.mkdir(parents=True, exist_ok=True)
    bcfg.setdefault("out", str(out))
    rows = bench.run_ttft(bcfg)
    if out.exists():  # every row of the sweep, including those of an interrupted earlier run
        return pd.read_csv(out)
    return pd.DataFrame(rows).apply(_numeric)


def _numeric(col: pd.Series) -> pd.Series:
    try:
        return pd.to_numeric(col)
    except (TypeError, ValueError):
        return col


def bench_or_reference(cfg: dict) -> pd.DataFrame:
    try:
        return run_bench(cfg)
    except MissingComponent as e:
        print(f"not measured here: {e}; drawing committed reference data only")
        return pd.DataFrame(columns=["device", "model", "tier", "history_tokens", "policy", "ttft_s",
                                     "restore_s", "stored_bytes", "full_kv_bytes"])


def history_ids(adapter, n_tokens: int) -> list[int]:
    conv = select_conversations("sharegpt", "test", n=1, min_turns=1, max_turns=20, min_chars=8 * n_tokens)[0]
    ids = adapter.tokenizer(" ".join(m["content"] for m in conv.messages))["input_ids"]
    if len(ids) < n_tokens:
        raise ExperimentError(f"no conversation with {n_tokens} tokens found; lower history_tokens")
    return ids


def prefill_kv(adapter, ids: list[int]):
    import torch
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = DynamicCache()
        adapter.forward(torch.tensor([ids], dtype=torch.long), cache, logits_to_keep=1)
        return adapter.kv_from_cache(cache)


def time_restore(adapter, store, key: str, new_ids: list[int], repeats: int, warmup: int = 1,
                 timeline: bool = False) -> list[dict]:
    """Restore a stored state and prefill `new_ids` over it; per repeat restore_s, ttft_s, the report
    (with its per-layer events when `timeline`)."""
    import torch

    from krul.restore import restore_cache

    out = []
    for rep in range(warmup + repeats):
        with torch.inference_mode():
            t0 = time.perf_counter()
            state = store.get(key)
            cache, report = restore_cache(adapter, state, extra_tokens=len(new_ids), timeline=timeline)
            t1 = time.perf_counter()
            logits = adapter.forward(torch.tensor([new_ids], dtype=torch.long), cache, logits_to_keep=1)
            int(logits[0, -1].argmax())
            t2 = time.perf_counter()
        if rep >= warmup:
            out.append({"restore_s": t1 - t0, "ttft_s": t2 - t0, "report": report})
    return out


def rates_or_fit(adapter, tier: str, fitted=None):
    try:
        return get_rates(adapter, tier), "profile"
    except MissingComponent:
        if fitted is None:
            raise
        return fitted, "fitted from the endpoints of this sweep"

