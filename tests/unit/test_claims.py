"""Figure verdicts: a smoke run never judges a claim; other profiles apply the YAML's predicate."""
import pandas as pd

from krul import experiments


def test_smoke_runs_are_not_judged(monkeypatch):
    """The same metric value holds under the default profile and is 'not judged' under smoke."""
    monkeypatch.setitem(experiments.CLAIM_METRICS, "_test", lambda df, cfg: 10.0)
    claim = {"metric": "_test", "op": ">=", "threshold": 1.0, "tolerance": 0.0}
    judged = experiments.check_claim({"slug": "x", "profile": "default", "claim": claim}, pd.DataFrame())
    smoke = experiments.check_claim({"slug": "x", "profile": "smoke", "claim": claim}, pd.DataFrame())
    assert judged["verdict"] == "holds" and smoke["verdict"] == "not judged (smoke profile)"
    failing = dict(claim, threshold=100.0)
    assert experiments.check_claim({"slug": "x", "profile": "default", "claim": failing},
                                   pd.DataFrame())["verdict"] == "does not hold"
