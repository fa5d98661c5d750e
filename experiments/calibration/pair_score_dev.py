"""Dev-split comparison of what krul's per-conversation pair choice ranks by (session 4).

Usage: python experiments/calibration/pair_score_dev.py MODEL N_CONVERSATIONS RANK_RATIO PAIRS... [--compress JSON]
       [--reduce joint|layers] [--sensitivity] [--policies ...]
One base pass (estimator stats and svd pair losses), then at tau 0, recompute ratio 0, for each pair
count: krul-svd (attention distance), krul-svd-loss (svd loss of the conversation's own KV),
krul-fix-svd (the plan of experiments/calibration/MODEL.svd.json) and krul-fix-svd-loss (the plan
of lowest mean svd loss over these same dev conversations: in-sample, so favoured). Prints one
JSON line per point; the per-conversation nll sums go with it so that pairs of policies can be
compared conversation by conversation.
"""
import argparse, json
import torch
from krul import models
from krul.adapter import ModelAdapter
from krul.calibrate import (base_pass, grid_policy, layer_sensitivity, mean_pair_losses, per_conv,
                            pick_conversations, record_pair_losses, replay_with, with_rank_ratio_or_self)
from krul.policies import get_policy
from krul.selector import SelectionInput, calibrate_fixed_pairs

p = argparse.ArgumentParser()
p.add_argument("model"); p.add_argument("n", type=int); p.add_argument("rank_ratio", type=float)
p.add_argument("pairs", type=int, nargs="+"); p.add_argument("--compress", default="{}")
p.add_argument("--reduce", default="joint", choices=["joint", "layers"], help="svd loss reduction")
p.add_argument("--sensitivity", action="store_true",
               help="weight each layer's own svd error by its dev nll sensitivity (calibrate.layer_sensitivity)")
p.add_argument("--policies", nargs="+", default=["krul-svd", "krul-svd-loss", "krul-fix-svd", "krul-fix-svd-loss"])
a = p.parse_args()
extra = json.loads(a.compress)
m, tok = models.load_model(a.model)
ad = ModelAdapter(m, tok, a.model)
convs = pick_conversations("dev", a.n, 2000, tok, 3)
records, base_rows = base_pass(ad, convs, 3, False)
scorer = with_rank_ratio_or_self(get_policy("krul-svd-loss"), a.rank_ratio)
scorer = scorer.with_params(compress_params={**scorer.compress_params, **extra}, loss_reduce=a.reduce)
if a.sensitivity:
    import time
    t0 = time.time()
    sens = layer_sensitivity(ad, convs, a.rank_ratio, 3, progress=False)
    print(json.dumps({"layer_sensitivity": sens, "seconds": round(time.time() - t0, 1)}), flush=True)
    scorer = scorer.with_params(layer_weights=tuple(sens["weights"]))
losses = record_pair_losses(ad, scorer, convs, 3, False)
cal = json.load(open(f"experiments/calibration/{a.model}.svd.json"))
br = torch.stack([r[-1].boundary_ratio().cpu() for r in records.values()]).mean(0)
loss_plan = calibrate_fixed_pairs([SelectionInput(mean_pair_losses(losses, convs, tok, 3), br, ad.n_layers)],
                                  max(a.pairs), "ascending", tau=0.0)
base = per_conv(base_rows)
for k in a.pairs:
    for name in a.policies:
        if name in ("krul-svd", "krul-svd-loss"):
            pol = grid_policy(name, 0.0, k, ad.n_layers, a.rank_ratio)
        else:
            pairs = cal["krul_fix_pairs"] if name == "krul-fix-svd" else loss_plan
            pol = with_rank_ratio_or_self(get_policy(name, recompute_ratio=0.0), a.rank_ratio)
            pol = pol.with_params(selector_params={**pol.selector_params, "pairs": tuple(map(tuple, pairs[:k]))})
        pol = pol.with_params(compress_params={**pol.compress_params, **extra})
        rows = replay_with(ad, pol, convs, records, 3, losses=losses)
        from krul.evaluation import paired_ratio_ci, summarize
        s = summarize(rows, ad.name, pol.name)
        pt, lo, hi = paired_ratio_ci(per_conv(rows), base)
        print(json.dumps({"policy": name, "pairs": k, "rank_ratio": a.rank_ratio, "reduce": a.reduce,
                          "sensitivity": a.sensitivity, **extra,
                          "compression_ratio": round(s["compression_ratio"], 4), "nll_ratio": round(pt, 5),
                          "nll_ratio_lo": round(lo, 5), "nll_ratio_hi": round(hi, 5),
                          "per_conv": {c: [round(x[0], 4), x[1]] for c, x in per_conv(rows).items()}}), flush=True)
