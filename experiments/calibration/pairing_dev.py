"""Dev-split comparison of greedy vs exact (matching) pairing for the svd-loss policies (session 5).

Usage: python experiments/calibration/pairing_dev.py MODEL N_EVAL PAIRS... [--pairings greedy matching]
On the N_EVAL dev conversations after the calibration record's own (out of sample, as test is;
the same ones as pair_prior_dev.py), for each pair count and pairing: krul-svd-loss (each
conversation's own scores) and krul-fix-svd-loss (one plan from the record's dev mean scores,
"mean_pair_loss", with the same pairing). One JSON line per point, per-conversation nll sums with it.
"""
import argparse, json, time

import torch
from dev_eval import out_of_sample, scored_replay
from krul.calibrate import curve_policy
from krul.policies import json_matrix
from krul.selector import PAIRINGS

p = argparse.ArgumentParser()
p.add_argument("model"); p.add_argument("n_eval", type=int); p.add_argument("pairs", type=int, nargs="+")
p.add_argument("--pairings", nargs="+", default=["greedy", "matching"], choices=list(PAIRINGS))
a = p.parse_args()
t0 = time.time()
cal, ad, eval_convs, records, base_rows, losses = out_of_sample(a.model, a.n_eval)
if "mean_pair_loss" not in cal:
    raise SystemExit("the record has no mean_pair_loss: run pair_prior_dev.py --write first")
prior = torch.tensor(json_matrix(cal["mean_pair_loss"]), dtype=torch.float64)
for k in a.pairs:
    for pairing in a.pairings:
        own = curve_policy("krul-svd-loss", k, ad.n_layers, cal, cal["tau"], cal["rank_ratio"], 0.0)
        own = own.with_params(selector_params={**own.selector_params, "pairing": pairing})
        fixed_pairs = PAIRINGS[pairing](prior, range(ad.n_layers), k)
        fix = curve_policy("krul-fix-svd-loss", k, ad.n_layers, cal, cal["tau"], cal["rank_ratio"])
        fix = fix.with_params(selector_params={**fix.selector_params, "pairs": tuple(fixed_pairs)})
        for pol in (own, fix):
            _, fields = scored_replay(ad, pol, eval_convs, records, base_rows, losses, cal["max_turns"])
            per = fields.pop("per_conv")
            print(json.dumps({"policy": pol.name, "pairs": k, "pairing": pairing, **fields,
                              "seconds": round(time.time() - t0, 1),
                              **({"fixed_pairs": [list(q) for q in fixed_pairs]} if pol is fix else {}),
                              "per_conv": per}), flush=True)
