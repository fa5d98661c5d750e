"""Figure 3: KV storage per policy, per model, vs history length.

`run` replays ShareGPT test conversations under each policy and records the bytes of the state
restored before each turn against the full KV of that history; `claim` is full / stored bytes of
krul at the longest history.
"""
from __future__ import annotations

import pandas as pd

from krul.figures.common import (MissingComponent, PartialResults, get_adapter, largest, make_engine, policy_key,
                                 progress, replay_cached, select_conversations)

METRIC = "storage_ratio_at_longest"  # the name experiments/fig3_storage.yaml gives `claim`


def run(cfg: dict) -> pd.DataFrame:
    """Stored bytes of each restored state per policy and model vs its history length (turn rows)."""
    cache = PartialResults(cfg["out_dir"], "fig3_storage", cfg)
    ds = cfg["conversations"]
    out, skipped = [], []
    for model in cfg["models"]:
        adapter = get_adapter(model, cfg["device"])
        n = ds.get("n_per_model", {}).get(model, ds.get("n", 2))
        convs = select_conversations("sharegpt", ds.get("split", "test"), n=n, min_turns=ds.get("max_turns", 3),
                                     max_turns=ds.get("max_turns", 3), max_chars=ds.get("max_chars"),
                                     min_chars=ds.get("min_chars", 0), clip_chars=ds.get("clip_chars"))
        for policy_name in cfg["policies"]:
            try:
                engine = make_engine(adapter, policy_name, tier=cfg.get("tier", "pageable"), max_new_tokens=1,
                                     seed=cfg["seed"])
            except MissingComponent as e:
                skipped.append(f"{model}/{policy_name}: {e}")
                continue
            for conv in progress(convs, f"{model} {policy_name}"):
                key = f"{model}|{policy_key(engine.policy)}|{conv.content_key}"
                for r in replay_cached(cache, key, engine, conv, ds.get("max_turns", 3)):
                    if r["turn_idx"] < 1:
                        continue
                    out.append({"model": model, "policy": policy_name, "conversation_id": conv.id,
                                "turn_idx": r["turn_idx"], "history_tokens": r["history_tokens"],
                                "stored_bytes": r["stored_bytes"], "full_kv_bytes": r["full_kv_bytes"],
                                "storage_bytes": r.get("storage_bytes"),
                                "full_storage_bytes": r.get("full_storage_bytes"),
                                "recompute_ratio": r["recompute_ratio"],
                                "n_pairs": len((r.get("plan") or {}).get("pairs", []) or [])})
    for s in skipped:
        print(f"skipped (not measured): {s}")
    df = pd.DataFrame(out)
    if not df.empty:
        full, stored = _bytes(df)
        df["storage_ratio"] = df[full] / df[stored].where(df[stored] > 0)
    return df


def _bytes(df) -> tuple[str, str]:
    """The (full, stored) byte columns a storage ratio is taken from: the bf16 storage bytes
    (`TurnResult.storage_bytes`, 2 bytes per unquantized element), or for runs recorded before
    they existed the model-dtype bytes."""
    if "storage_bytes" in df and df["storage_bytes"].notna().all() and (df["storage_bytes"] > 0).any():
        return "full_storage_bytes", "storage_bytes"
    return "full_kv_bytes", "stored_bytes"


def claim(df, cfg):
    """Full / stored KV bytes of the claim's policy (krul), summed over its turns at the longest history
    (bf16 storage bytes; model-dtype bytes for runs that predate them).

    With `baselines` in the YAML's claim (say `[minicache]`, the paper's "fixed compression"), the
    smallest over the full KV and each listed baseline present of its bytes over krul's, on the same
    turns: any listed baseline that stores less than krul fails it, as the full KV does."""
    claim = cfg["claim"]
    d = largest(df[df.policy == claim.get("policy", "krul")])
    if d.empty:
        return None
    full, stored = _bytes(d)
    if d[stored].sum() == 0:
        return None
    ratios = [float(d[full].sum() / d[stored].sum())]
    for b in claim.get("baselines") or []:
        rows = df[(df.policy == b) & (df.history_tokens == d.history_tokens.iloc[0])]
        if "model" in df:
            rows = rows[rows.model.isin(d.model)]
        if not rows.empty:
            ratios.append(float(rows[stored].sum() / d[stored].sum()))
    return min(ratios)
