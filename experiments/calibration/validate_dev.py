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
from pathlib import Path

from krul import models
from krul.adapter import ModelAdapter
from krul.calibrate import base_pass, curve_policy, per_conv, pick_conversations, record_pair_losses, replay_with
from krul.evaluation import paired_ratio_ci, summarize
from krul.policies import get_policy, with_dev_scores, with_rank_ratio

p = argparse.ArgumentParser()
p.add_argument("model"); p.add_argument("n_eval", type=int); p.add_argument("pairs", type=int, nargs="+")
p.add_argument("--tokens", type=int, nargs="+", default=[128])
p.add_argument("--baselines", action="store_true")
a = p.parse_args()
cal = json.loads(Path(f"experiments/calibration/{a.model}.svd-loss.json").read_text())
m, tok = models.load_model(a.model)
ad = ModelAdapter(m, tok, a.model)
t0 = time.time()
pool = pick_conversations("dev", len(cal["conversations"]) + a.n_eval, 2000, tok, cal["max_turns"])
eval_convs = [c for c in pool if c.id not in cal["conversations"]][:a.n_eval]
print(json.dumps({"eval": [c.id for c in eval_convs]}), flush=True)
scorer = with_dev_scores(with_rank_ratio(get_policy("krul-svd-loss"), cal["rank_ratio"]), cal, 0.0)
records, base_rows = base_pass(ad, eval_convs, cal["max_turns"], False)
losses = record_pair_losses(ad, scorer, eval_convs, cal["max_turns"], False)
base = per_conv(base_rows)
for k in a.pairs:
    own = curve_policy("krul-svd-loss", k, ad.n_layers, cal, cal["tau"], cal["rank_ratio"], 0.0, "greedy")
    fix = curve_policy("krul-fix-svd-loss", k, ad.n_layers, cal, cal["tau"], cal["rank_ratio"], pairing="greedy")
    dev_set = set(map(tuple, fix.selector_params["pairs"]))
    runs = [(own.with_params(validate_tokens=w), w) for w in a.tokens]
    if a.baselines:
        runs += [(own, 0), (fix, 0)]
    for pol, w in runs:
        rows = replay_with(ad, pol, eval_convs, records, cal["max_turns"], losses=losses)
        s = summarize(rows, ad.name, pol.name)
        pt, lo, hi = paired_ratio_ci(per_conv(rows), base)
        restored = [r for r in rows if r.turn_idx >= 1]
        n_dev = sum(set(map(tuple, r.plan.get("pairs", []))) == dev_set for r in restored)
        print(json.dumps({"policy": pol.name, "pairs": k, "validate_tokens": w,
                          "compression_ratio": round(s["compression_ratio"], 4), "nll_ratio": round(pt, 5),
                          "nll_ratio_lo": round(lo, 5), "nll_ratio_hi": round(hi, 5),
                          "restored_with_dev_plan": n_dev, "restored": len(restored),
                          "seconds": round(time.time() - t0, 1),
                          "per_conv": {c: [round(x[0], 4), x[1]] for c, x in per_conv(rows).items()}}),
              flush=True)
