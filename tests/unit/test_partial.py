"""A figure's partial results resume only under the code and settings that made them."""
import json

from krul.figures import common
from krul.figures.common import PartialResults


def test_units_resume_under_the_same_stamp(tmp_path):
    cfg = {"models": ["m"], "seed": 0, "out_dir": str(tmp_path)}
    a = PartialResults(tmp_path, "fig", cfg)
    a.add("u1", {"x": 1})
    b = PartialResults(tmp_path, "fig", {**cfg, "out_dir": "elsewhere"})  # where it is written is not a setting
    assert "u1" in b and b.get("u1") == {"x": 1}


def test_other_settings_recompute_once_and_keep_the_old_file(tmp_path, capsys):
    cfg = {"models": ["m"], "seed": 0}
    PartialResults(tmp_path, "fig", cfg).add("u1", 1)
    c = PartialResults(tmp_path, "fig", {**cfg, "seed": 1})
    assert "u1" not in c
    out = capsys.readouterr().out
    assert out.count("recomputing") == 1 and "fig.stale-" in out
    stale = list((tmp_path / "partial").glob("fig.stale-*.jsonl"))
    assert len(stale) == 1 and '"u1"' in stale[0].read_text()  # nothing deleted
    assert "u1" not in PartialResults(tmp_path, "fig", {**cfg, "seed": 1})  # and it says so only once
    assert "recomputing" not in capsys.readouterr().out


def test_a_code_change_recomputes(tmp_path, monkeypatch, capsys):
    PartialResults(tmp_path, "fig", {}).add("u1", 1)
    monkeypatch.setattr("krul.evaluation.code_version", lambda: "edited")
    assert "u1" not in PartialResults(tmp_path, "fig", {})
    assert "recomputing" in capsys.readouterr().out


def test_an_unstamped_file_from_older_code_is_not_reused(tmp_path, capsys):
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "fig.jsonl").write_text(json.dumps({"key": "u1", "value": 1}) + "\n")
    assert "u1" not in PartialResults(tmp_path, "fig", {})
    assert (tmp_path / "partial" / "fig.stale-unstamped.jsonl").exists()
    assert common.run_stamp({"a": 1}) != common.run_stamp({"a": 2})


def test_a_policy_parameter_change_recomputes(tmp_path, monkeypatch, capsys):
    """The stamp holds the run's policies as the registry resolves them: a registry entry patched in
    a session (or a re-written calibration) is not in the source digest, but it is a new stamp."""
    from krul import policies

    cfg = {"models": ["m"], "policies": ["minicache", "full-load"], "seed": 0}
    PartialResults(tmp_path, "fig", cfg).add("u1", 1)
    assert "u1" in PartialResults(tmp_path, "fig", cfg)
    mini = policies.POLICIES["minicache"]
    monkeypatch.setitem(policies.POLICIES, "minicache",
                        mini.with_params(selector_params={**mini.selector_params, "target_ratio": 2.0}))
    assert "u1" not in PartialResults(tmp_path, "fig", cfg)
    assert capsys.readouterr().out.count("recomputing") == 1
    # a policy the run does not use changes nothing
    monkeypatch.setitem(policies.POLICIES, "krul", policies.POLICIES["krul"].with_params(min_gain=0.5))
    PartialResults(tmp_path, "fig", cfg).add("u2", 2)
    assert "u2" in PartialResults(tmp_path, "fig", cfg)
    assert common.run_stamp({"models": ["m"], "policies": ["nope"]})  # an unknown policy fails in the run, not here
