"""The GPU acceptance verdicts of krul's restore, read from the bench's rows (`krul.bench` csv).

At llama-7b, pinned tier, graph new-input path (the rows `bash experiments/bench_gpu.sh accept`
measures), with "krul" the quality-validated policy's row with its plan (`krul-svd-loss`):
- `lengths`: at every length from 500 to 8000, krul's TTFT median is at most 1.03x the best of
  full-load, cake and partial-recompute;
- `wins_4000`: at 4000 tokens krul beats full-load, cake, partial-recompute, minicache and kvsharer:
  its TTFT median is at least 3% lower than the rival's and below the rival's minimum;
- `compression_pays`: from 2000 tokens up, krul with its plan restores faster than krul without it
  (the same policy storing uncompressed KV), and their restore min-max ranges do not overlap;
- `bound`: from 4000 tokens up, restore / bound is at most 1.15;
- `disk`: on the disk tier krul does not lose: a loss is a rival whose TTFT median is at least 3%
  lower than krul's and below krul's minimum.
Each verdict is PASS, FAIL (with the numbers that failed it) or MISSING (rows absent). Any baseline
row can fail them: nothing here knows which policy is expected to win.

Usage: `python -m krul.gpu_accept ROWS.csv [--policy krul-svd-loss] [--json OUT]`.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

LENGTHS = (500, 1000, 2000, 4000, 8000)
LOAD_RIVALS = ("full-load", "cake", "partial-recompute")
WIN_RIVALS = ("full-load", "cake", "partial-recompute", "minicache", "kvsharer")
TOLERANCE = 1.03  # `lengths`: krul within 3% of the best of LOAD_RIVALS
MARGIN = 0.97  # a win / a loss: a median at least 3% lower (and beyond the other's minimum)
BOUND_MAX = 1.15


def _f(row: dict, key: str) -> float:
    return float(row[key])


def _index(rows: list[dict], model: str, tier: str, path: str, policy: str) -> dict:
    """{(policy name, history_tokens): row}; krul's rows split into "krul" (with a plan) and
    "krul/none" (its uncompressed twin)."""
    out = {}
    for r in rows:
        if r["model"] != model or r["tier"] != tier or str(r.get("prefill_path") or "graph") != path:
            continue
        name = r["policy"]
        if name == policy:
            name = "krul/none" if str(r["plan_source"]).startswith("none") else "krul"
        out[(name, int(float(r["history_tokens"])))] = r
    return out


def verdicts(rows: list[dict], policy: str = "krul-svd-loss", model: str = "llama-7b",
             path: str = "graph") -> dict:
    """{criterion: {"verdict": PASS | FAIL | MISSING, "detail": [...]}} for the rows."""
    pinned = _index(rows, model, "pinned", path, policy)
    out = {}

    def result(name, fails, missing, detail):
        verdict = "MISSING" if missing and not fails else ("FAIL" if fails else "PASS")
        out[name] = {"verdict": verdict, "fails": fails, "missing": missing, "detail": detail}

    fails, missing, detail = [], [], []
    for n in LENGTHS:
        k = pinned.get(("krul", n))
        rivals = [pinned[(b, n)] for b in LOAD_RIVALS if (b, n) in pinned]
        if k is None or not rivals:
            missing.append(n)
            continue
        best = min(rivals, key=lambda r: _f(r, "ttft_s"))
        ratio = _f(k, "ttft_s") / _f(best, "ttft_s")
        detail.append(f"N={n}: krul {_f(k, 'ttft_s') * 1e3:.1f} ms / {best['policy']} "
                      f"{_f(best, 'ttft_s') * 1e3:.1f} ms = {ratio:.3f}")
        if ratio > TOLERANCE:
            fails.append(n)
    result("lengths", fails, missing, detail)

    fails, missing, detail = [], [], []
    k = pinned.get(("krul", 4000))
    for b in WIN_RIVALS:
        r = pinned.get((b, 4000))
        if k is None or r is None:
            missing.append(b)
            continue
        win = _f(k, "ttft_s") <= MARGIN * _f(r, "ttft_s") and _f(k, "ttft_s") < _f(r, "ttft_s_min")
        detail.append(f"vs {b}: krul {_f(k, 'ttft_s') * 1e3:.1f} ms, {b} {_f(r, 'ttft_s') * 1e3:.1f} ms "
                      f"(min {_f(r, 'ttft_s_min') * 1e3:.1f}): {'win' if win else 'no win'}")
        if not win:
            fails.append(b)
    result("wins_4000", fails, missing, detail)

    fails, missing, detail = [], [], []
    for n in (x for x in LENGTHS if x >= 2000):
        k, u = pinned.get(("krul", n)), pinned.get(("krul/none", n))
        if k is None or u is None:
            missing.append(n)
            continue
        ok = _f(k, "restore_s") < _f(u, "restore_s") and _f(k, "restore_s_max") < _f(u, "restore_s_min")
        detail.append(f"N={n}: restore with plan {_f(k, 'restore_s') * 1e3:.1f} ms "
                      f"[{_f(k, 'restore_s_min') * 1e3:.1f}, {_f(k, 'restore_s_max') * 1e3:.1f}], without "
                      f"{_f(u, 'restore_s') * 1e3:.1f} ms [{_f(u, 'restore_s_min') * 1e3:.1f}, "
                      f"{_f(u, 'restore_s_max') * 1e3:.1f}]")
        if not ok:
            fails.append(n)
    result("compression_pays", fails, missing, detail)

    fails, missing, detail = [], [], []
    for n in (x for x in LENGTHS if x >= 4000):
        k = pinned.get(("krul", n))
        if k is None:
            missing.append(n)
            continue
        x = _f(k, "restore_over_bound")
        detail.append(f"N={n}: restore/bound {x:.3f}")
        if not x <= BOUND_MAX:
            fails.append(n)
    result("bound", fails, missing, detail)

    disk = _index(rows, model, "disk", path, policy)
    fails, missing, detail = [], [], []
    ns = sorted({n for (name, n) in disk if name == "krul"})
    if not ns:
        missing.append("disk rows")
    for n in ns:
        k = disk[("krul", n)]
        for (b, m), r in sorted(disk.items()):
            if m != n or b in ("krul", "krul/none"):
                continue
            loss = _f(r, "ttft_s") <= MARGIN * _f(k, "ttft_s") and _f(r, "ttft_s") < _f(k, "ttft_s_min")
            detail.append(f"N={n} vs {b}: {_f(r, 'ttft_s') * 1e3:.1f} ms against krul "
                          f"{_f(k, 'ttft_s') * 1e3:.1f} ms (min {_f(k, 'ttft_s_min') * 1e3:.1f})"
                          + (": LOSS" if loss else ""))
            if loss:
                fails.append(f"{b}@{n}")
    result("disk", fails, missing, detail)
    return out


def read_rows(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m krul.gpu_accept", description=__doc__.splitlines()[0])
    p.add_argument("rows", help="the bench's csv")
    p.add_argument("--policy", default="krul-svd-loss", help="the krul row's policy name")
    p.add_argument("--model", default="llama-7b")
    p.add_argument("--path", default="graph", help="new-input prefill path")
    p.add_argument("--json", help="write the verdicts here as JSON")
    args = p.parse_args(argv)
    out = verdicts(read_rows(args.rows), args.policy, args.model, args.path)
    for name, v in out.items():
        print(f"{name:17s} {v['verdict']}" + (f"  fails: {v['fails']}" if v["fails"] else "")
              + (f"  missing: {v['missing']}" if v["missing"] else ""))
        for line in v["detail"]:
            print(f"    {line}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0 if all(v["verdict"] == "PASS" for v in out.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
