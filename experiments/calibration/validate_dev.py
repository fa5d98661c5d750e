"""Dev-split check of plan validation for krul-svd-loss (session 6, `krul.validation`).

Usage: python experiments/calibration/validate_dev.py MODEL N_EVAL PAIRS... [--tokens 64 128]
        [--baselines]
On the N_EVAL dev conversations after the calibration record's own (out of sample, as test is;
the same ones as pairing_dev.py), for each pair count: krul-svd-loss choosing per segment between
its own greedy plan and the dev plan (krul-fix-svd-loss's pairs) by the KL divergence of the
predictions at the history's last `--tokens` positions; with --baselines also the two plans alone.
One JSON line per point, with how often the dev plan was chosen and per-conversation nll sums.
"""
import argparse, json, time

from dev_eval import out_of_sample, scored_replay
from krul.calibrate import curve_policy

p = argparse.ArgumentParser()
p.add_argument("model"); p.add_argument("n_eval", type=int); p.add_argument("pairs", type=int, nargs="+")
p.add_argument("--tokens", type=int, nargs="+", default=[128])
p.add_argument("--baselines", action="store_true")
a = p.parse_args()
t0 = time.time()
cal, ad, eval_convs, records, base_rows, losses = out_of_sample(a.model, a.n_eval)
for k in a.pairs:
    own = curve_policy("krul-svd-loss", k, ad.n_layers, cal, cal["tau"], cal["rank_ratio"], 0.0, "greedy")
    fix = curve_policy("krul-fix-svd-loss", k, ad.n_layers, cal, cal["tau"], cal["rank_ratio"], pairing="greedy")
    dev_set = set(map(tuple, fix.selector_params["pairs"]))
    runs = [(own.with_params(validate_tokens=w), w) for w in a.tokens]
    if a.baselines:
        runs += [(own, 0), (fix, 0)]
    for pol, w in runs:
        rows, fields = scored_replay(ad, pol, eval_convs, records, base_rows, losses, cal["max_turns"])
        restored = [r for r in rows if r.turn_idx >= 1]
        n_dev = sum(set(map(tuple, r.plan.get("pairs", []))) == dev_set for r in restored)
        per = fields.pop("per_conv")
        print(json.dumps({"policy": pol.name, "pairs": k, "validate_tokens": w, **fields,
                          "restored_with_dev_plan": n_dev, "restored": len(restored),
                          "seconds": round(time.time() - t0, 1), "per_conv": per}), flush=True)
