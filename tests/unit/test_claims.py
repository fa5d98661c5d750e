"""Figure verdicts: a smoke run never judges a claim; other profiles apply the YAML's predicate."""
import pandas as pd

from krul import experiments


def test_smoke_runs_are_not_judged(monkeypatch):
    """The same metric value holds under the default profile and is 'smoke run: not a measurement' under smoke."""
    monkeypatch.setitem(experiments.CLAIM_METRICS, "_test", lambda df, cfg: 10.0)
    claim = {"metric": "_test", "op": ">=", "threshold": 1.0, "tolerance": 0.0}
    judged = experiments.check_claim({"slug": "x", "profile": "default", "claim": claim}, pd.DataFrame())
    smoke = experiments.check_claim({"slug": "x", "profile": "smoke", "claim": claim}, pd.DataFrame())
    assert judged["verdict"] == "holds" and smoke["verdict"] == "smoke run: not a measurement"
    failing = dict(claim, threshold=100.0)
    assert experiments.check_claim({"slug": "x", "profile": "default", "claim": failing},
                                   pd.DataFrame())["verdict"] == "does not hold"


def test_cache_keys_change_with_the_conversation_and_the_policy():
    """An edited conversation under the same id, or a policy with another parameter, gets another key."""
    from krul.data import Conversation
    from krul.policies import get_policy

    a = Conversation("c1", [{"role": "user", "content": "hi"}], "test")
    b = Conversation("c1", [{"role": "user", "content": "hi!"}], "test")
    assert a.content_key != b.content_key and a.content_key.startswith("c1@")
    assert a.content_key == Conversation("c1", [{"role": "user", "content": "hi"}], "x").content_key
    p = get_policy("krul")
    q = p.with_params(selector_params={**p.selector_params, "target_ratio": 1.7})
    assert experiments.policy_key(p) != experiments.policy_key(q)
    assert experiments.policy_key(p) == experiments.policy_key(get_policy("krul"))


def test_fig2_predicate_fails_when_any_baseline_is_faster():
    """The strongest-rival predicate holds when krul is fastest on every tier and fails when one
    baseline beats it on one tier (full recompute alone could never fail it)."""
    cfg = {"slug": "fig2_ttft", "profile": "default",
           "claim": {"metric": "best_baseline_over_krul_at_longest", "op": ">=", "threshold": 1.0,
                     "baselines": ["full-load", "cake"]}}
    rows = []
    for tier in ("pageable", "disk"):
        for policy, t in (("full-recompute", 2.0), ("full-load", 0.5), ("cake", 0.4), ("krul", 0.3)):
            rows.append({"tier": tier, "policy": policy, "history_tokens": 512, "ttft_s": t})
            rows.append({"tier": tier, "policy": policy, "history_tokens": 128, "ttft_s": t / 4})
    df = pd.DataFrame(rows)
    ok = experiments.check_claim(cfg, df)
    assert ok["verdict"] == "holds" and abs(ok["value"] - 0.4 / 0.3) < 1e-9
    df.loc[(df.tier == "disk") & (df.policy == "cake") & (df.history_tokens == 512), "ttft_s"] = 0.2
    bad = experiments.check_claim(cfg, df)
    assert bad["verdict"] == "does not hold" and abs(bad["value"] - 0.2 / 0.3) < 1e-9


def test_fig8_predicate_is_not_applicable_when_no_layer_was_protected():
    """fig8 compares krul with krul-no-preempt: it holds when protecting layers lowers the nll, fails
    when it raises it, and is 'not applicable' (with the reason) when krul protected no layer, where
    the two policies are the same and a ratio of 1.0 would hold vacuously."""
    cfg = {"slug": "fig8_ablation", "profile": "default",
           "claim": {"metric": "nll_krul_over_no_preempt", "op": "<=", "threshold": 1.0, "tolerance": 0.005}}

    def rows(krul_nll, protected):
        return pd.DataFrame([{"policy": "krul", "nll": krul_nll, "protected_layers": protected},
                             {"policy": "krul-no-preempt", "nll": 2.0, "protected_layers": 0.0}])
    assert experiments.check_claim(cfg, rows(1.9, 2.0))["verdict"] == "holds"
    assert experiments.check_claim(cfg, rows(2.2, 2.0))["verdict"] == "does not hold"
    vacuous = experiments.check_claim(cfg, rows(2.0, 0.0))
    assert vacuous["verdict"] == "not applicable" and "protected no layer" in vacuous["text"]


def test_fig6_bubbles_are_idle_time_inside_each_stream():
    """A stream's bubble is the gap between its events (not the time before its first one); a split
    that recomputes nothing is marked single-stream."""
    from krul.figures.fig6_restore_timeline import stream_bubbles, with_bubbles

    ev = pd.DataFrame([
        {"variant": "fixed", "stream": "load", "layer_idx": 0, "start_s": 0.0, "end_s": 0.1, "recompute_ratio": 0.4},
        {"variant": "fixed", "stream": "load", "layer_idx": 1, "start_s": 0.5, "end_s": 0.6, "recompute_ratio": 0.4},
        {"variant": "fixed", "stream": "recompute", "layer_idx": 0, "start_s": 0.2, "end_s": 0.4,
         "recompute_ratio": 0.4},
        {"variant": "fixed", "stream": "recompute", "layer_idx": 1, "start_s": 0.3, "end_s": 0.45,
         "recompute_ratio": 0.4},
        {"variant": "bubble-free", "stream": "load", "layer_idx": 0, "start_s": 0.0, "end_s": 0.2,
         "recompute_ratio": 0.0}])
    bubbles = stream_bubbles(ev[ev.variant == "fixed"])
    assert abs(bubbles["load"] - 0.4) < 1e-12 and abs(bubbles["recompute"]) < 1e-12  # overlap is busy
    out = with_bubbles(ev)
    fixed, free = out[out.variant == "fixed"].iloc[0], out[out.variant == "bubble-free"].iloc[0]
    assert abs(fixed.bubble_s - 0.4) < 1e-12 and not fixed.single_stream
    assert free.bubble_s == 0.0 and free.single_stream


def test_a_smoke_run_is_not_judged_even_when_the_claim_does_not_apply():
    cfg = {"slug": "fig8_ablation", "profile": "smoke",
           "claim": {"metric": "nll_krul_over_no_preempt", "op": "<=", "threshold": 1.0}}
    df = pd.DataFrame([{"policy": "krul", "nll": 2.0, "protected_layers": 0.0},
                       {"policy": "krul-no-preempt", "nll": 2.0, "protected_layers": 0.0}])
    assert experiments.check_claim(cfg, df)["verdict"] == "smoke run: not a measurement"
