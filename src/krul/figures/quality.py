"""The quality loop of fig4 and fig8: replay conversations under each policy and model, then one
row per policy with nll (+ bootstrap CI), its ratio to full-load, greedy agreement, ROUGE-L, bytes.

Knows nothing about either figure's datasets or claim: the caller passes the datasets and a cache name.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from krul.figures.common import (MissingComponent, get_adapter, long_context_turn, make_engine, make_policy,
                                 PartialResults, policy_key, progress, replay_cached, select_conversations,
                                 turn_json, turns_from_json)


def _quality_summary(rows_by_policy: dict, model: str, dataset: str, history: str, mtbench_refs=None,
                     rouge: bool = True, n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """One row per policy: nll (+ bootstrap CI), ratio to full-load (paired bootstrap CI), greedy
    agreement (+ bootstrap CI over turns), ROUGE-L, bytes."""
    from krul.evaluation import paired_ratio_ci, summarize

    base = None
    if "full-load" in rows_by_policy:
        base = summarize(turns_from_json(rows_by_policy["full-load"]), model, "full-load", history=history)
    out = []
    for policy, rows in rows_by_policy.items():
        turns = turns_from_json(rows)
        s = summarize(turns, model, policy, mtbench_refs=mtbench_refs, rouge=rouge, history=history)
        if dataset == "mtbench":
            s["nll"], s["nll_ci95"] = None, [None, None]
        ratio = (None, None, None)
        if base is not None and s["nll"] is not None and base["nll"]:
            ratio = paired_ratio_ci(s["per_conversation"], base["per_conversation"], n_boot=n_boot, seed=seed)
        # greedy agreement per scored turn, bootstrap over turns
        from krul.evaluation import GREEDY_TOKENS, load_reference

        agree = []
        for r in turns:
            if r.turn_idx < 1:
                continue
            ref = load_reference(model, r.conversation_key or r.conversation_id, r.turn_idx, history)
            if ref is None:
                continue
            # over the reference's first GREEDY_TOKENS tokens (fewer when the profile decodes fewer)
            width = min(GREEDY_TOKENS, len(ref["ids"]))
            if width == 0:
                continue
            n = 0
            for a, b in zip(r.generated_ids[:width], ref["ids"][:width]):
                if a != b:
                    break
                n += 1
            agree.append(n / width)
        g_lo, g_hi = _bootstrap_mean(agree, n_boot, seed)
        out.append({
            "model": model, "dataset": dataset, "policy": policy, "n_conversations": s["n_conversations"],
            "n_scored_tokens": s["n_scored_tokens"], "nll": s["nll"], "nll_ci_lo": s["nll_ci95"][0],
            "nll_ci_hi": s["nll_ci95"][1], "nll_ratio": ratio[0], "nll_ratio_ci_lo": ratio[1],
            "nll_ratio_ci_hi": ratio[2], "greedy_match_rate": float(np.mean(agree)) if agree else None,
            "greedy_ci_lo": g_lo, "greedy_ci_hi": g_hi,
            "rougeL_vs_full_load": s.get("rougeL_vs_full_load"),
            "rougeL_vs_reference": s.get("rougeL_vs_reference"),
            "stored_bytes": s["stored_bytes"], "full_kv_bytes": s["full_kv_bytes"],
            "storage_ratio": s["storage_ratio"], "compression_ratio": s["compression_ratio"],
            "recompute_ratio": s["recompute_ratio"],
            # layers the selector protected (kept exact as input-sensitive), mean over restored plans
            "protected_layers": _mean_protected(turns),
        })
    return out


def _mean_protected(turns) -> float | None:
    """Mean number of layers the restored states' plans protected (`CompressionPlan.sensitive`),
    over the turns that restored a plan (None when none did)."""
    counts = [len(t.plan.get("sensitive", ()) or ()) for t in turns if t.turn_idx >= 1 and t.plan]
    return float(np.mean(counts)) if counts else None


def _bootstrap_mean(values, n_boot=2000, seed=0, level=0.95):
    if not values:
        return None, None
    v = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def _policy_list(cfg: dict) -> list[str]:
    policies = list(cfg["policies"])
    if "full-load" in policies:  # its greedy answers are the references of the others
        policies.remove("full-load")
        policies.insert(0, "full-load")
    return policies


def replay_quality(cfg: dict, datasets: list[dict], cache_name: str) -> pd.DataFrame:
    """Replay each dataset's conversations under each policy and model; summarise per policy."""
    cache = PartialResults(cfg["out_dir"], cache_name, cfg)
    out, skipped = [], []
    for model in cfg["models"]:
        adapter = get_adapter(model, cfg["device"])
        for ds in datasets:
            if model in ds.get("skip_models", []):
                continue
            n = ds.get("n_per_model", {}).get(model, ds.get("n", 2))
            convs = select_conversations(ds.get("spec", "sharegpt"), ds.get("split", "test"), n=n,
                                         min_turns=ds.get("min_turns", 2), max_turns=ds.get("max_turns", 2),
                                         max_chars=ds.get("max_chars"), min_chars=ds.get("min_chars", 0),
                                         clip_chars=ds.get("clip_chars"))
            history = "model" if ds["name"] == "mtbench" else "teacher"
            rows_by_policy = {}
            for policy_name in _policy_list(cfg):
                try:
                    policy = make_policy(policy_name, cfg.get("policy_overrides", {}).get(policy_name), model)
                    engine = make_engine(adapter, policy, tier=cfg.get("tier", "pageable"),
                                         max_new_tokens=cfg.get("max_new_tokens", 32), seed=cfg["seed"],
                                         history=history)
                except MissingComponent as e:
                    skipped.append(f"{model}/{policy_name}: {e}")
                    continue
                rows = []
                for conv in progress(convs, f"{model} {ds['name']} {policy_name}"):
                    key = f"{model}|{ds['name']}|{policy_key(engine.policy)}|{conv.content_key}"
                    if ds.get("protocol") == "long_context":
                        if key not in cache:
                            r = long_context_turn(engine, conv, ds.get("new_input_tokens", 128),
                                                  ds.get("max_context_tokens"))
                            cache.add(key, [turn_json(r)])
                        rows.extend(cache.get(key))
                    else:
                        rows.extend(replay_cached(cache, key, engine, conv, ds.get("max_turns", 2)))
                rows_by_policy[policy_name] = rows
            refs = {c.id: c.meta.get("references") for c in convs if c.meta.get("references")}
            out.extend(_quality_summary(rows_by_policy, model, ds["name"], history, mtbench_refs=refs,
                                        rouge=cfg.get("rouge", True), n_boot=cfg.get("n_boot", 2000),
                                        seed=cfg["seed"]))
    for s in skipped:
        print(f"skipped (not measured): {s}")
    return pd.DataFrame(out)

