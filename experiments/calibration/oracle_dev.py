"""How much any per-conversation choice between two plans could gain: the hindsight oracle.

Usage: python experiments/calibration/oracle_dev.py LOG [--pairing greedy]
From a pairing_dev.py log (per-conversation reply nll sums of krul-svd-loss, each conversation's
own plan, and krul-fix-svd-loss, the one dev plan), per pair count: the own plan's total nll over
the fixed plan's, and that of an oracle that takes, per conversation, whichever of the two had the
lower nll in hindsight (a bound on what choosing between them per conversation can gain).
"""
import argparse, json

p = argparse.ArgumentParser()
p.add_argument("log"); p.add_argument("--pairing", default="greedy")
a = p.parse_args()
rows = [json.loads(line) for line in open(a.log)]
by = {(r["policy"], r["pairs"]): r["per_conv"] for r in rows if r.get("pairing") == a.pairing}
for k in sorted({k for _, k in by}):
    own, fix = by[("krul-svd-loss", k)], by[("krul-fix-svd-loss", k)]
    s_fix = sum(v[0] for v in fix.values())
    print(json.dumps({"pairs": k, "conversations": len(own),
                      "own_over_fixed": round(sum(v[0] for v in own.values()) / s_fix, 5),
                      "oracle_over_fixed": round(sum(min(own[c][0], fix[c][0]) for c in own) / s_fix, 5),
                      "own_lower": sum(own[c][0] < fix[c][0] for c in own)}))
