"""Dev-split test of per-segment svd rank allocation (beyond the paper; session 9).

Usage: python experiments/calibration/rank_alloc_dev.py MODEL N_EVAL PAIRS...
On the N_EVAL out-of-sample dev conversations (dev_eval.out_of_sample, as pairing_dev.py), for each
pair count and policy (default krul-fix-svd-loss): uniform ranks (xKV, the default); rank_alloc
"segment" / "pairs" (joint absolute error); the basis of relative errors (basis_weights 1) alone and
with "segment"; and "segment" weighted by the record's `layer_sensitivity`. Same bytes by
construction; one JSON line per point.
"""
import argparse, json, time

from dev_eval import out_of_sample, scored_replay
from krul.calibrate import curve_policy

p = argparse.ArgumentParser()
p.add_argument("model"); p.add_argument("n_eval", type=int); p.add_argument("pairs", type=int, nargs="+")
p.add_argument("--variants", nargs="+", default=["uniform", "segment", "pairs", "relative-basis", "segment-relative", "segment-weighted"])
p.add_argument("--policies", nargs="+", default=["krul-fix-svd-loss"])
a = p.parse_args()
t0 = time.time()
cal, ad, eval_convs, records, base_rows, losses = out_of_sample(a.model, a.n_eval)
weights = cal["layer_sensitivity"]
for k in a.pairs:
    for name in a.policies:
        for variant in a.variants:
            pol = curve_policy(name, k, ad.n_layers, cal, cal["tau"], cal["rank_ratio"])
            extra = {"uniform": {}, "segment": {"rank_alloc": "segment"}, "pairs": {"rank_alloc": "pairs"},
                     "relative-basis": {"basis_weights": [1.0] * ad.n_layers},
                     "segment-relative": {"rank_alloc": "segment", "basis_weights": [1.0] * ad.n_layers},
                     "segment-weighted": {"rank_alloc": "segment", "basis_weights": weights}}[variant]
            pol = pol.with_params(compress_params={**pol.compress_params, **extra})
            _, fields = scored_replay(ad, pol, eval_convs, records, base_rows, losses, cal["max_turns"])
            per = fields.pop("per_conv")
            print(json.dumps({"policy": pol.name, "pairs": k, "rank_alloc": variant, **fields,
                              "seconds": round(time.time() - t0, 1), "per_conv": per}), flush=True)
