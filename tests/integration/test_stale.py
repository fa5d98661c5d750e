"""Stale results (issue 22): a policy parameter changed between two runs of a figure into the same
folder recomputes the figure's units instead of resuming them, and says so once."""
import pytest

from krul import experiments, policies

pytestmark = pytest.mark.integration


def test_a_changed_policy_parameter_reruns_a_smoke_figure_into_the_same_folder(tmp_path, monkeypatch, capsys):
    """fig3's smoke profile on the real smollm2 (full-load and minicache only: no estimator, no
    measured rates), run twice into one folder: the second run, after minicache's target_ratio is
    lowered in the registry, reports a recompute once and stores other bytes."""
    cfg = experiments.load_config("fig3_storage", "smoke", device="cpu", out_dir=str(tmp_path),
                                  policies=["full-load", "minicache"])

    def minicache_ratio():
        df = experiments.run_figure(cfg)
        assert not df.empty
        d = df[df.policy == "minicache"]
        return float(d.full_kv_bytes.sum() / d.stored_bytes.sum())

    first = minicache_ratio()
    assert "recomputing" not in capsys.readouterr().out
    assert minicache_ratio() == first  # unchanged settings resume: same numbers, no notice
    assert "recomputing" not in capsys.readouterr().out
    mini = policies.POLICIES["minicache"]
    assert mini.selector_params["target_ratio"] > 1.1  # 7 pairs of smollm2's 30 layers (all its deep-half candidates)
    monkeypatch.setitem(policies.POLICIES, "minicache",  # 3 pairs
                        mini.with_params(selector_params={**mini.selector_params, "target_ratio": 1.1}))
    second = minicache_ratio()
    out = capsys.readouterr().out
    assert out.count("recomputing") == 1, out
    assert second < first * 0.95, (first, second)  # fewer pairs merged: more bytes stored
    assert list((tmp_path / "partial").glob("fig3_storage.stale-*.jsonl"))  # the old units kept aside
