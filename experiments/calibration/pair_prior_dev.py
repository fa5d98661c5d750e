"""Dev-split choice of krul-svd-loss's `prior_weight` (session 5): how far to shrink a
conversation's own svd-loss pair scores toward the dev mean.

Usage: python experiments/calibration/pair_prior_dev.py MODEL N_EVAL PAIRS... [--betas ...] [--write]
The prior is the mean pair score over the calibration record's own dev conversations
(experiments/calibration/MODEL.svd-loss.json, weighted by its layer sensitivities); it must give
the record's krul_fix_loss_pairs again (checked). The weights are then evaluated, out of sample as
on test, on the next N_EVAL dev conversations in hash order (never the record's): one JSON line per
(pairs, prior_weight) with the per-conversation nll sums. prior_weight 1 is the record's fixed plan
(krul-fix-svd-loss). --write adds the prior ("mean_pair_loss") to the record.

       python experiments/calibration/pair_prior_dev.py MODEL --choose LOG
writes into the record the prior_weight of lowest mean dev nll ratio over the pair counts of
LOG (this script's output), with the grid it chose from ("prior_weight_dev").
"""
import argparse, json, time
from pathlib import Path

import torch
from krul import models
from krul.adapter import ModelAdapter
from krul.calibrate import (base_pass, curve_policy, matrix_json, mean_pair_losses, per_conv, pick_conversations,
                            record_pair_losses, replay_with)
from krul.evaluation import paired_ratio_ci, summarize
from krul.policies import get_policy, with_dev_scores, with_rank_ratio
from krul.selector import SelectionInput, calibrate_fixed_pairs

p = argparse.ArgumentParser()
p.add_argument("model"); p.add_argument("n_eval", type=int, nargs="?"); p.add_argument("pairs", type=int, nargs="*")
p.add_argument("--choose", default=None, help="a log of this script: write its best prior_weight")
p.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.5, 1.0])
p.add_argument("--write", action="store_true")
a = p.parse_args()
path = Path(f"experiments/calibration/{a.model}.svd-loss.json")
cal = json.loads(path.read_text())
if a.choose:
    lines = [json.loads(x) for x in Path(a.choose).read_text().splitlines() if x.startswith("{")]
    head, grid = lines[0], [g for g in lines if "prior_weight" in g]
    betas = sorted({g["prior_weight"] for g in grid})
    counts = sorted({g["pairs"] for g in grid})
    mean = {b: sum(g["nll_ratio"] for g in grid if g["prior_weight"] == b) / len(counts) for b in betas}
    assert all(sum(g["prior_weight"] == b for g in grid) == len(counts) for b in betas), "incomplete grid"
    best = min(betas, key=lambda b: (mean[b], b))
    cal["prior_weight"] = best
    cal["prior_weight_dev"] = {"eval_conversations": head["eval"], "pair_counts": counts,
                               "mean_nll_ratio": {str(b): mean[b] for b in betas},
                               "grid": [{k: v for k, v in g.items() if k != "per_conv"} for g in grid]}
    path.write_text(json.dumps(cal, indent=1))
    print(json.dumps({"prior_weight": best, "mean_nll_ratio": mean}))
    raise SystemExit(0)
m, tok = models.load_model(a.model)
ad = ModelAdapter(m, tok, a.model)
t0 = time.time()
scorer = with_dev_scores(with_rank_ratio(get_policy("krul-svd-loss"), cal["rank_ratio"]), cal, 0.0)
pool = pick_conversations("dev", len(cal["conversations"]) + a.n_eval, 2000, tok, cal["max_turns"])
prior_convs = [c for c in pool if c.id in cal["conversations"]]
assert [c.id for c in prior_convs] == cal["conversations"], "the record's dev conversations moved"
eval_convs = [c for c in pool if c.id not in cal["conversations"]][:a.n_eval]
prior = mean_pair_losses(record_pair_losses(ad, scorer, prior_convs, cal["max_turns"], False),
                         prior_convs, tok, cal["max_turns"])
fixed = calibrate_fixed_pairs([SelectionInput(prior, torch.ones(ad.n_layers), ad.n_layers)],
                              len(cal["krul_fix_loss_pairs"]), order="ascending", tau=cal["tau"])
same = [list(q) for q in fixed] == cal["krul_fix_loss_pairs"]
print(json.dumps({"prior_from": cal["conversations"], "eval": [c.id for c in eval_convs],
                  "prior_reproduces_krul_fix_loss_pairs": same, "seconds": round(time.time() - t0, 1)}), flush=True)
if not same:
    raise SystemExit("the recomputed prior does not give the record's fixed plan: settings differ")
if a.write:
    cal["mean_pair_loss"] = matrix_json(prior)
    path.write_text(json.dumps(cal, indent=1))
cal = {**cal, "mean_pair_loss": matrix_json(prior)}
records, base_rows = base_pass(ad, eval_convs, cal["max_turns"], False)
losses = record_pair_losses(ad, scorer, eval_convs, cal["max_turns"], False)
base = per_conv(base_rows)
for k in a.pairs:
    for beta in a.betas:
        pol = curve_policy("krul-svd-loss", k, ad.n_layers, cal, cal["tau"], cal["rank_ratio"], beta)
        rows = replay_with(ad, pol, eval_convs, records, cal["max_turns"], losses=losses)
        s = summarize(rows, ad.name, pol.name)
        pt, lo, hi = paired_ratio_ci(per_conv(rows), base)
        print(json.dumps({"pairs": k, "prior_weight": beta, "compression_ratio": round(s["compression_ratio"], 4),
                          "nll_ratio": round(pt, 5), "nll_ratio_lo": round(lo, 5), "nll_ratio_hi": round(hi, 5),
                          "seconds": round(time.time() - t0, 1),
                          "per_conv": {c: [round(x[0], 4), x[1]] for c, x in per_conv(rows).items()}}), flush=True)
