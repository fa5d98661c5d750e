"""Figure 1: the most similar layer pairs differ between conversations.

`run` replays dev and test conversations with the estimator and lists every layer pair's distance and
whether krul's selector chose it; `claim` is the mean Jaccard overlap of the chosen pairs between two
conversations of one model.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from krul.figures.common import estimator_stats, get_adapter, select_conversations

METRIC = "mean_pair_jaccard"  # the name experiments/fig1_similarity_variability.yaml gives `claim`


def run(cfg: dict) -> pd.DataFrame:
    """One row per (model, conversation, layer pair i<j): distance, whether krul selected it."""
    rows = []
    for model in cfg["models"]:
        adapter = get_adapter(model, cfg["device"])
        for split in cfg.get("splits", ["dev", "test"]):
            n = cfg.get("n_per_model", {}).get(model, cfg.get("n", 2))
            convs = select_conversations("sharegpt", split, n=n, max_turns=cfg.get("max_turns", 2),
                                         max_chars=cfg.get("max_chars"), clip_chars=cfg.get("clip_chars"))
            for rec in estimator_stats(adapter, convs, cfg.get("max_turns", 2), cfg, f"fig1_{model}_{split}"):
                d = np.asarray(rec["distances"])
                chosen = {tuple(sorted(p)) for p in rec["pairs"]}
                for i in range(d.shape[0]):
                    for j in range(i + 1, d.shape[0]):
                        rows.append({"model": model, "split": split, "conversation_id": rec["conversation_id"],
                                     "n_tokens": rec["n_tokens"], "layer_a": i, "layer_b": j,
                                     "distance": float(d[i, j]), "selected": (i, j) in chosen,
                                     "boundary_a": float(rec["boundary"][i]),
                                     "sensitive_a": i in set(rec["sensitive"])})
    return pd.DataFrame(rows)


def claim(df, cfg):
    """Mean Jaccard overlap of the selected pairs between two conversations (same model)."""
    vals = []
    for _, g in df.groupby("model"):
        sets = [frozenset(zip(s.layer_a, s.layer_b)) for _, s in g[g.selected].groupby("conversation_id")]
        for i in range(len(sets)):
            for j in range(i + 1, len(sets)):
                u = sets[i] | sets[j]
                vals.append(len(sets[i] & sets[j]) / len(u) if u else 1.0)
    return float(np.mean(vals)) if vals else None
