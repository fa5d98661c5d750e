"""How many conversations would tell per-conversation choice from the one dev plan: a power estimate.

Usage: python experiments/calibration/power_dev.py LOG [--pairing greedy] [--by policy --own P --fixed P]
From a pairing_dev.py log (or a pair_prior_dev.py one: `--by prior_weight --own 0.0 --fixed 1.0`),
whose rows hold per-conversation reply nll sums (`per_conv`), per pair count: the paired ratio
R = sum(own) / sum(fixed) over the conversations, its standard error by the delta method (residuals
own_c - R fixed_c, i.e. the ratio-of-sums estimator the curves report), and the number of
conversations of the same spread at which the 95% interval of R would exclude 1 if R stayed where
it is: n * (1.96 SE / |R - 1|)^2. Pure arithmetic on the log; nothing is rerun.
"""
import argparse
import json
import math

p = argparse.ArgumentParser()
p.add_argument("log")
p.add_argument("--pairing", default="greedy")
p.add_argument("--by", default="policy", help="the field that tells the two plans apart")
p.add_argument("--own", default="krul-svd-loss")
p.add_argument("--fixed", default="krul-fix-svd-loss")
a = p.parse_args()
rows = [json.loads(line) for line in open(a.log)]
by = {(str(r[a.by]), r["pairs"]): r["per_conv"] for r in rows
      if "per_conv" in r and a.by in r and r.get("pairing", "greedy") == a.pairing}
for k in sorted({k for _, k in by}):
    if (a.own, k) not in by or (a.fixed, k) not in by:
        continue
    own, fix = by[(a.own, k)], by[(a.fixed, k)]
    convs = sorted(own)
    n = len(convs)
    s_own, s_fix = sum(own[c][0] for c in convs), sum(fix[c][0] for c in convs)
    r = s_own / s_fix
    resid = [own[c][0] - r * fix[c][0] for c in convs]
    se = math.sqrt(sum(e * e for e in resid) * n / (n - 1)) / s_fix
    need = n * (1.96 * se / abs(r - 1.0)) ** 2 if r != 1.0 else float("inf")
    print(json.dumps({"pairs": k, "conversations": n, "own_over_fixed": round(r, 5),
                      "se": round(se, 5), "ci95": [round(r - 1.96 * se, 5), round(r + 1.96 * se, 5)],
                      "conversations_to_resolve": round(need)}))
