"""Figure 4: reply quality per policy (nll, ROUGE-L, greedy agreement).

`run` is the shared quality loop (`krul.figures.quality`) over ShareGPT test, MT-Bench turn 2 and the
long-context protocol; `claim` is the largest nll(krul) / nll(full-load) over models on ShareGPT.
"""
from __future__ import annotations

import pandas as pd

from krul.figures.quality import replay_quality

METRIC = "max_nll_ratio_vs_full"  # the name experiments/fig4_accuracy.yaml gives `claim`


def run(cfg: dict) -> pd.DataFrame:
    """nll / ROUGE-L / greedy agreement per policy: ShareGPT test, MT-Bench turn 2, long-context."""
    return replay_quality(cfg, cfg["datasets"], "fig4_quality")


def claim(df, cfg):
    """The largest nll(policy) / nll(full-load) over models, ShareGPT rows of the claim's policy (krul)."""
    d = df[(df.policy == cfg["claim"].get("policy", "krul")) & (df.dataset == "sharegpt")]
    d = d[d.nll_ratio.notna()]
    return float(d.nll_ratio.max()) if not d.empty else None
