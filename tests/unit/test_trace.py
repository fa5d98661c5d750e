"""`krul trace` on the tiny chat model: 6 conversations as concurrent sessions over one tiered store
with budgets that force demotion and deletion; every turn is served (no conversation lost), the
lossless policies pass the spot check (the full recompute's greedy tokens), and the report carries
percentiles, throughput, per-tier bytes and hits, ratios to full-recompute and provenance."""
import json

import pytest

from krul.data import Conversation
from krul.trace import (TraceConfig, TraceError, add_arguments, config_from_args, main, make_schedule,
                        run_trace, summary)

pytestmark = pytest.mark.usefixtures("one_thread")


def _conversations(n=6, turns=3):
    out = []
    for i in range(n):
        msgs = []
        for t in range(turns):
            msgs += [{"role": "user", "content": f"conversation {i}, question {t}: what about item {7 * i + t}?"},
                     {"role": "assistant", "content": f"Answer {t} to {i}: item {7 * i + t} is fine."}]
        out.append(Conversation(f"c{i}", msgs, "test"))
    return out


def _cfg(**kw):
    # 150 KiB pageable + 200 KiB disk: over 70 repeats (40 quiet, 30 with two busy cores) every run
    # demoted (>= 4), deleted (>= 6) and fell back (>= 4); 200/300 KiB left 2 of 12 runs without a
    # fallback (the states evicted past disk were ones no later turn read)
    base = dict(model="tiny-chat", n_conversations=6, workers=3, arrival_rate=50.0, think_s=0.01,
                spot_ratio=0.5, budgets="pageable=150KiB,disk=200KiB", seed=3)
    return TraceConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def report(tiny_chat):
    return run_trace(tiny_chat, _conversations(), _cfg(), progress=False)


def test_every_turn_is_served_and_lossless_policies_pass_the_spot_check(report):
    """No lost conversation under any policy; full-recompute, full-load and cake reproduce the full
    recompute's greedy tokens on every sampled turn, though budgets deleted states on the way."""
    by = {r["policy"]: r for r in report["policies"]}
    assert list(by) == ["full-recompute", "full-load", "cake", "krul-svd-loss"]
    for r in by.values():
        assert r["turns"] == r["turns_planned"] == 18 and r["lost_conversations"] == 0 and not r["errors"]
        assert r["spot_turns"] > 0
    for name in ("full-recompute", "full-load", "cake"):
        assert by[name]["lossless"] and by[name]["spot_mismatches"] == 0
    assert not by["krul-svd-loss"]["lossless"]
    load = by["full-load"]
    assert load["demotions"] > 0 and load["deletions"] > 0 and load["fallbacks"] > 0
    # which tier a resumed turn hits depends on the sessions' real-time interleaving (a loaded machine
    # reorders them), so only the budget is asserted here; test_store_tiers checks the demotion chain
    assert load["tiers"]["disk"]["peak_bytes"] <= 200 << 10


def test_report_has_percentiles_throughput_tiers_ratios_and_provenance(report):
    """The numbers the issue asks for are there, ratios to full-recompute are 1 for itself, and the
    report is JSON with the git sha, versions, device, config and seed."""
    base = report["policies"][0]
    assert base["vs_full_recompute"]["ttft_s_p99"] == pytest.approx(1.0)
    for r in report["policies"]:
        assert r["ttft_s"]["p50"] <= r["ttft_s"]["p95"] <= r["ttft_s"]["p99"]
        assert r["turns_per_s"] > 0 and r["prefill_tokens_per_s"] > 0
        assert r["prefill_tokens"] == sum(x["history_tokens"] + x["new_input_tokens"] for x in r["rows"])
        assert set(r["tiers"]) == {"pageable", "disk"} and "hit_rate" in r["tiers"]["disk"]
        assert set(r["vs_full_recompute"]) >= {"ttft_s_p50", "ttft_s_p95", "ttft_s_p99", "turns_per_s",
                                               "prefill_tokens_per_s"}
    prov = report["provenance"]
    assert prov["git_sha"] and prov["versions"]["torch"] and prov["device"] == "cpu"
    assert prov["seed"] == 3 and prov["config"]["n_conversations"] == 6
    json.dumps(report)
    assert len(summary(report)) == 4


def test_a_policys_compression_runs_outside_the_model_lock(tiny_chat, monkeypatch):
    """Only model work holds the trace's lock: a krul policy reads the estimator's sums under it, and
    builds (schedules, compresses) its state without it, so other sessions' forwards go on meanwhile."""
    from krul.engine import Engine
    from krul.policies import RestorePolicy
    from krul.scheduler import RestoreRates

    seen = {"stats": [], "build": []}
    stats, build = Engine.similarity_stats, RestorePolicy.build

    def stats_spy(engine, conversation_id):
        seen["stats"].append(engine.model_work()._is_owned())
        return stats(engine, conversation_id)

    def build_spy(policy, engine, *args, **kwargs):
        seen["build"].append(engine.model_work()._is_owned())
        return build(policy, engine, *args, **kwargs)

    monkeypatch.setattr(Engine, "similarity_stats", stats_spy)
    monkeypatch.setattr(RestorePolicy, "build", build_spy)
    rates = RestoreRates(recompute_s_per_token=1e-5, load_bytes_per_s=1e9)
    out = run_trace(tiny_chat, _conversations(3, 2), _cfg(n_conversations=3, workers=2, policies=("krul",)),
                    progress=False, rates=rates)
    assert out["policies"][0]["turns"] == 6 and not out["policies"][0]["errors"]
    assert seen["stats"] and all(seen["stats"])
    assert len(seen["build"]) == 6 and not any(seen["build"])


def test_the_schedule_is_seeded(tiny_chat):
    """Same seed, same arrivals, think times and spot turns; another seed, other arrivals."""
    from krul.engine import Engine
    from krul.store import make_store

    engine = Engine(tiny_chat, "full-recompute", make_store("pageable"))
    a, b = (make_schedule(engine, _conversations(), _cfg()) for _ in range(2))
    c = make_schedule(engine, _conversations(), _cfg(seed=4))
    spots = lambda s: [(t.conv_idx, t.turn_idx) for ts in s.turns for t in ts if t.spot]  # noqa: E731
    assert a.arrivals == b.arrivals and a.think == b.think and spots(a) == spots(b)
    assert a.arrivals != c.arrivals
    assert all(t.turn_idx > 0 for ts in a.turns for t in ts if t.spot)


def test_options_parse_and_bad_ones_exit_2(capsys):
    """add_arguments/config_from_args give the config; a bad policy or budget is a one-line exit 2."""
    import argparse

    args = add_arguments(argparse.ArgumentParser()).parse_args(
        ["-n", "6", "--policies", "full-recompute,full-load", "--budgets", "pageable=1MiB,disk=none"])
    cfg = config_from_args(args)
    assert cfg.n_conversations == 6 and cfg.policies == ("full-recompute", "full-load")
    with pytest.raises(TraceError, match="unknown policies"):
        _cfg(policies=("nope",)).check()
    assert main(["--policies", "nope"]) == 2
    assert main(["--budgets", "ram=1G"]) == 2
    assert main(["--data", "/nonexistent.jsonl"]) == 2
    assert "krul trace:" in capsys.readouterr().err


def test_fig10_rows_and_claim_from_a_trace_report(report):
    """fig10's rows carry every policy's throughput, TTFT percentiles and their ratios to
    full-recompute; its claim (the krul-family policy's prefill tokens/s over the strongest
    baseline's, smallest over budget settings) holds when krul is fastest and fails as soon as one
    baseline is faster, in any one budget setting."""
    import pandas as pd

    from krul.figures.fig10_throughput import claim, rows_of

    df = pd.DataFrame(rows_of(report, "forced", "krul-svd-loss"))
    assert list(df.policy) == ["full-recompute", "full-load", "cake", "krul-svd-loss"]
    assert list(df.role) == ["baseline"] * 3 + ["krul-family"]
    base = df[df.policy == "full-recompute"].iloc[0]
    assert base.prefill_tokens_per_s_vs_full_recompute == pytest.approx(1.0)
    assert base.ttft_p99_vs_full_recompute == pytest.approx(1.0)
    assert (df.ttft_p50_s <= df.ttft_p99_s).all() and (df.turns == 18).all()
    cfg = {"claim": {"policy": "krul-svd-loss", "baselines": ["full-recompute", "full-load", "cake"]}}
    tput = dict(zip(df.policy, df.prefill_tokens_per_s))
    expected = tput["krul-svd-loss"] / max(tput[p] for p in ("full-recompute", "full-load", "cake"))
    assert claim(df, cfg) == pytest.approx(expected)

    def setting(name, krul, best_rival):
        d = df.copy()
        d["budget_set"] = name
        d.loc[d.policy == "krul-svd-loss", "prefill_tokens_per_s"] = krul
        d.loc[d.policy != "krul-svd-loss", "prefill_tokens_per_s"] = [100.0, best_rival, 90.0]
        return d

    wins = pd.concat([setting("default", 150.0, 120.0), setting("forced", 130.0, 110.0)])
    assert claim(wins, cfg) == pytest.approx(130.0 / 110.0)
    one_loses = pd.concat([setting("default", 150.0, 120.0), setting("forced", 100.0, 125.0)])
    assert claim(one_loses, cfg) == pytest.approx(100.0 / 125.0) and claim(one_loses, cfg) < 1.0
    assert claim(df[df.policy != "krul-svd-loss"], cfg) is None  # no krul-family row: not measured
