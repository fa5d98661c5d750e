"""GPU acceptance verdicts: they pass when krul wins and fail when any rival beats it."""
from pathlib import Path

from krul import gpu_accept

RUN1 = Path(__file__).resolve().parents[2] / "results/fig2_ttft/reference/h200-37ed210/run1-ttft.csv"


def _row(policy, n, ttft, restore, tier="pinned", plan="plan-file x", spread=0.01, bound=1.0):
    return {"model": "llama-7b", "tier": tier, "prefill_path": "graph", "policy": policy,
            "history_tokens": str(n), "plan_source": plan, "ttft_s": str(ttft),
            "ttft_s_min": str(ttft * (1 - spread)), "ttft_s_max": str(ttft * (1 + spread)),
            "restore_s": str(restore), "restore_s_min": str(restore * (1 - spread)),
            "restore_s_max": str(restore * (1 + spread)), "restore_over_bound": str(bound)}


def _rows(krul_scale=0.8, none_scale=1.0, kvsharer=1.0):
    rows = []
    for n in gpu_accept.LENGTHS:
        base = n / 1000
        for b in ("full-load", "cake", "partial-recompute", "minicache"):
            rows.append(_row(b, n, base, base * 0.8))
        rows.append(_row("kvsharer", n, base * kvsharer, base * kvsharer * 0.8))
        rows.append(_row("krul-svd-loss", n, base * krul_scale, base * krul_scale * 0.8, bound=1.1))
        rows.append(_row("krul-svd-loss", n, base * none_scale, base * none_scale * 0.8, plan="none: no plan"))
    for b, t in (("full-recompute", 0.13), ("full-load", 1.8)):
        rows.append(_row(b, 4000, t, t, tier="disk"))
    rows.append(_row("krul-svd-loss", 4000, 0.13, 0.13, tier="disk"))
    return rows


def test_all_pass_when_krul_wins():
    """Krul 20% below every rival, compressed faster than uncompressed: every verdict passes."""
    out = gpu_accept.verdicts(_rows())
    assert {k: v["verdict"] for k, v in out.items()} == dict.fromkeys(out, "PASS")


def test_a_faster_rival_fails_the_win_and_compression_must_pay():
    """A kvsharer 30% below krul fails wins_4000; an uncompressed twin as fast fails compression_pays."""
    out = gpu_accept.verdicts(_rows(kvsharer=0.56, none_scale=0.8))
    assert out["wins_4000"]["verdict"] == "FAIL" and out["wins_4000"]["fails"] == ["kvsharer"]
    assert out["compression_pays"]["verdict"] == "FAIL"
    assert out["lengths"]["verdict"] == "PASS"


def test_missing_rows_are_missing_not_pass():
    """Without krul rows every verdict says MISSING."""
    rows = [r for r in _rows() if r["policy"] != "krul-svd-loss"]
    assert all(v["verdict"] == "MISSING" for v in gpu_accept.verdicts(rows).values())


def test_the_first_h200_run_fails():
    """The recorded run at 37ed210 (krul's svd row under the name 'krul') fails lengths, wins, compression and bound."""
    out = gpu_accept.verdicts(gpu_accept.read_rows(RUN1), policy="krul")
    for name in ("lengths", "wins_4000", "compression_pays", "bound"):
        assert out[name]["verdict"] == "FAIL", name
