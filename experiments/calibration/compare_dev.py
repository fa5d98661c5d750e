"""Paired comparison of two variants in a dev JSONL (pairing_dev.py, rank_alloc_dev.py, ...).

Usage: python experiments/calibration/compare_dev.py FILE FIELD BASE OTHER
For each pair count: the nll ratio OTHER / BASE over the conversations both scored (paired
bootstrap 95% CI, `evaluation.paired_ratio_ci`) and on how many OTHER's reply nll is lower.
Example: compare_dev.py experiments/calibration/smollm2-135m.rank-alloc.dev.jsonl rank_alloc uniform pairs
"""
import argparse, json

from krul.evaluation import paired_ratio_ci

p = argparse.ArgumentParser()
p.add_argument("file"); p.add_argument("field"); p.add_argument("base"); p.add_argument("other")
a = p.parse_args()
rows = [json.loads(line) for line in open(a.file)]
by = {(r["pairs"], r[a.field]): r["per_conv"] for r in rows if "per_conv" in r and a.field in r}
for k in sorted({key[0] for key in by}):
    if (k, a.base) not in by or (k, a.other) not in by:
        continue
    base, other = by[(k, a.base)], by[(k, a.other)]
    pt, lo, hi = paired_ratio_ci(other, base)
    lower = sum(other[c][0] < base[c][0] for c in base if c in other)
    print(json.dumps({"pairs": k, f"{a.other}/{a.base}": round(pt, 5), "lo": round(lo, 5), "hi": round(hi, 5),
                      "other_lower_on": lower, "conversations": len(set(base) & set(other))}))
