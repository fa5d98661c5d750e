"""Figure 8: krul against its ablations.

`run` is the shared quality loop (`krul.figures.quality`) over krul's variants, with krul-fix's one
plan calibrated here on dev conversations; `claim` is nll(krul) / nll(krul-no-preempt).
"""
from __future__ import annotations

import copy

import pandas as pd

from krul.figures.common import (MissingComponent, NotApplicable, estimator_stats, finite, get_adapter, make_policy,
                                 select_conversations)
from krul.figures.quality import replay_quality

METRIC = "nll_krul_over_no_preempt"  # the name experiments/fig8_ablation.yaml gives `claim`


def run(cfg: dict) -> pd.DataFrame:
    """Krul vs its ablations (nll, bytes); krul-fix gets one plan calibrated on `dev` here."""
    cfg = copy.deepcopy(cfg)
    if "krul-fix" in cfg["policies"] and cfg.get("calibrate_fix", True):
        try:
            pairs = calibrate_fix_pairs(cfg)
            cfg.setdefault("policy_overrides", {})["krul-fix"] = {
                "selector_params": {"pairs": [list(p) for p in pairs], "method": "merge"}}
            print(f"krul-fix pairs calibrated on dev: {pairs}")
        except MissingComponent as e:
            print(f"krul-fix not calibrated (not measured): {e}")
            cfg["policies"] = [p for p in cfg["policies"] if p != "krul-fix"]
    return replay_quality(cfg, cfg["datasets"], "fig8_ablation")


def claim(df, cfg):
    """nll(krul) / nll(krul-no-preempt) (means over models and datasets when several rows).
    Not applicable when krul's selector protected no layer in any restored plan: krul is then
    krul-no-preempt, and the ratio (1.0) says nothing about protecting layers."""
    d = df.set_index("policy")
    if "krul" not in d.index or "krul-no-preempt" not in d.index:
        return None
    if "protected_layers" in df:
        protected = pd.to_numeric(df.loc[df.policy == "krul", "protected_layers"], errors="coerce")
        if protected.notna().any() and float(protected.fillna(0).max()) == 0.0:
            raise NotApplicable("krul's selector protected no layer at its tau in any restored plan, so krul "
                                "equals krul-no-preempt here; the ablation needs a tau that protects a layer")
    a, b = d.loc["krul", "nll"], d.loc["krul-no-preempt", "nll"]
    if isinstance(a, pd.Series):
        a, b = a.mean(), b.mean()
    return float(a / b) if finite(a) and finite(b) else None


def calibrate_fix_pairs(cfg: dict):
    """One plan for every conversation from estimator stats of `dev` conversations (Krul(Fix))."""
    from krul.selector import SelectionInput, calibrate_fixed_pairs, n_pairs_for_ratio

    model = cfg["models"][0]
    adapter = get_adapter(model, cfg["device"])
    krul = make_policy("krul", model=model)
    cal = cfg.get("calibration", {})
    stats = estimator_stats(adapter, select_conversations("sharegpt", "dev", n=cal.get("n", 2),
                                                         max_turns=cal.get("max_turns", 2),
                                                         max_chars=cal.get("max_chars"),
                                                         clip_chars=cal.get("clip_chars")),
                            cal.get("max_turns", 2), cfg, cache_name=f"fig8_calibration_{model}")
    inputs = [SelectionInput(distances=torch_tensor(s["distances"]), boundary_ratio=torch_tensor(s["boundary"]),
                             n_layers=adapter.n_layers,
                             layer_bytes_per_token=float(adapter.layer_kv_bytes_per_token())) for s in stats]
    n_pairs = n_pairs_for_ratio(adapter.n_layers, krul.selector_params.get("target_ratio", 1.5))
    return calibrate_fixed_pairs(inputs, n_pairs, order="ascending", tau=krul.selector_params.get("tau"))


def torch_tensor(x):
    import torch

    return torch.tensor(x, dtype=torch.float64)
