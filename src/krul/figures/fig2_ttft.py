"""Figure 2: TTFT and restore time per policy across history lengths and tiers.

`run` is `krul.bench.run_ttft` with the YAML's `bench` settings (committed reference rows only when
the bench is absent); `claim` is the strongest rival's TTFT over krul's at the longest history, the
smallest over tiers (`common.best_baseline_over_krul`, shared with fig9).
"""
from __future__ import annotations

import pandas as pd

from krul.figures.common import best_baseline_over_krul
from krul.figures.timing import bench_or_reference

METRIC = "best_baseline_over_krul_at_longest"  # the name experiments/fig2_ttft.yaml gives `claim`


def run(cfg: dict) -> pd.DataFrame:
    return bench_or_reference(cfg)


claim = best_baseline_over_krul
