"""Dev-split comparison of greedy vs exact (matching) pairing for the svd-loss policies (session 5).

Usage: python experiments/calibration/pairing_dev.py MODEL N_EVAL PAIRS... [--pairings greedy matching]
On the N_EVAL dev conversations after the calibration record's own (out of sample, as test is;
the same ones as pair_prior_dev.py), for each pair count and pairing: krul-svd-loss (each
conversation's own scores) and krul-fix-svd-loss (one plan from the record's dev mean scores,
"mean_pair_loss", with the same pairing). One JSON line per point, per-conversation nll sums with it.
"""
import argparse, json, time
from pathlib import Path

import torch
from krul import models
from krul.adapter import ModelAdapter
from krul.calibrate import base_pass, curve_policy, per_conv, pick_conversations, record_pair_losses, replay_with
from krul.evaluation import paired_ratio_ci, summarize
from krul.policies import get_policy, json_matrix, with_dev_scores, with_rank_ratio
from krul.selector import PAIRINGS

p = argparse.ArgumentParser()
p.add_argument("model"); p.add_argument("n_eval", type=int); p.add_argument("pairs", type=int, nargs="+")
p.add_argument("--pairings", nargs="+", default=["greedy", "matching"], choices=list(PAIRINGS))
a = p.parse_args()
cal = json.loads(Path(f"experiments/calibration/{a.model}.svd-loss.json").read_text())
if "mean_pair_loss" not in cal:
    raise SystemExit("the record has no mean_pair_loss: run pair_prior_dev.py --write first")
m, tok = models.load_model(a.model)
ad = ModelAdapter(m, tok, a.model)
t0 = time.time()
pool = pick_conversations("dev", len(cal["conversations"]) + a.n_eval, 2000, tok, cal["max_turns"])
eval_convs = [c for c in pool if c.id not in cal["conversations"]][:a.n_eval]
print(json.dumps({"eval": [c.id for c in eval_convs]}), flush=True)
scorer = with_dev_scores(with_rank_ratio(get_policy("krul-svd-loss"), cal["rank_ratio"]), cal, 0.0)
prior = torch.tensor(json_matrix(cal["mean_pair_loss"]), dtype=torch.float64)
records, base_rows = base_pass(ad, eval_convs, cal["max_turns"], False)
losses = record_pair_losses(ad, scorer, eval_convs, cal["max_turns"], False)
base = per_conv(base_rows)
for k in a.pairs:
    for pairing in a.pairings:
        own = curve_policy("krul-svd-loss", k, ad.n_layers, cal, cal["tau"], cal["rank_ratio"], 0.0)
        own = own.with_params(selector_params={**own.selector_params, "pairing": pairing})
        fixed_pairs = PAIRINGS[pairing](prior, range(ad.n_layers), k)
        fix = curve_policy("krul-fix-svd-loss", k, ad.n_layers, cal, cal["tau"], cal["rank_ratio"])
        fix = fix.with_params(selector_params={**fix.selector_params, "pairs": tuple(fixed_pairs)})
        for pol in (own, fix):
            rows = replay_with(ad, pol, eval_convs, records, cal["max_turns"], losses=losses)
            s = summarize(rows, ad.name, pol.name)
            pt, lo, hi = paired_ratio_ci(per_conv(rows), base)
            print(json.dumps({"policy": pol.name, "pairs": k, "pairing": pairing,
                              "compression_ratio": round(s["compression_ratio"], 4), "nll_ratio": round(pt, 5),
                              "nll_ratio_lo": round(lo, 5), "nll_ratio_hi": round(hi, 5),
                              "seconds": round(time.time() - t0, 1),
                              **({"fixed_pairs": [list(q) for q in fixed_pairs]} if pol is fix else {}),
                              "per_conv": {c: [round(x[0], 4), x[1]] for c, x in per_conv(rows).items()}}),
                  flush=True)
