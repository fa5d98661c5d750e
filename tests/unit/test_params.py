"""Figure settings as parameters: `--set KEY=VALUE`, papermill's string values, unknown names refused."""
import pytest

from krul import experiments
from krul.experiments import ExperimentError


def test_set_values_parse_as_yaml_and_dotted_keys_nest():
    """`--set` values are YAML/JSON; `a.b=v` sets one entry of dict `a`, merged with other entries."""
    got = experiments.parse_sets(["models=[smollm2-135m]", 'policies=["full-load", "krul"]', "tier=disk",
                                  "conversations.n=3", "conversations.max_turns=2", "rouge=false"])
    assert got == {"models": ["smollm2-135m"], "policies": ["full-load", "krul"], "tier": "disk",
                   "conversations": {"n": 3, "max_turns": 2}, "rouge": False}
    with pytest.raises(ExperimentError, match="KEY=VALUE"):
        experiments.parse_sets(["models"])


def test_overrides_merge_over_the_profile_and_are_recorded():
    """A list replaces the profile's, a dict merges into it, None keeps it; the config records what was set."""
    base = experiments.load_config("fig3_storage", "smoke", device="cpu")
    cfg = experiments.load_config("fig3_storage", "smoke", device="cpu", models=["smollm2-135m"],
                                  conversations={"n": 3}, tier=None)
    assert cfg["models"] == ["smollm2-135m"] and cfg["tier"] == base["tier"]
    assert cfg["conversations"] == {**base["conversations"], "n": 3}
    assert cfg["overrides"] == {"models": ["smollm2-135m"], "conversations": {"n": 3}}
    assert "overrides" not in base


def test_papermill_strings_parse_when_the_yaml_has_a_list():
    """papermill's `-p models '["a"]'` arrives as a string: parsed as YAML where the YAML holds a list."""
    cfg = experiments.load_config("fig3_storage", "smoke", device="cpu", policies='["full-load", "krul"]')
    assert cfg["policies"] == ["full-load", "krul"]


def test_unknown_and_mistyped_parameters_are_errors():
    """An unknown name lists the known ones; a string where the YAML has a list is refused, not iterated."""
    with pytest.raises(ExperimentError, match=r"unknown parameter\(s\) 'n_convs'; known: profile, device, "
                                              r"out_dir, seed, models, policies, tier, conversations"):
        experiments.load_config("fig3_storage", "smoke", device="cpu", n_convs=3)
    with pytest.raises(ExperimentError, match="'models' must be a list"):
        experiments.load_config("fig3_storage", "smoke", device="cpu", models="smollm2-135m")
    with pytest.raises(ExperimentError, match="'repeats' must be a number"):
        experiments.load_config("fig5_ratio_sweep", "smoke", device="cpu", repeats="many")


def test_every_yaml_setting_is_a_parameter():
    """settings() lists every key of `params` and of every profile (profile-only keys included)."""
    assert experiments.settings("fig3_storage") == ["models", "policies", "tier", "conversations"]
    assert "clip_chars" in experiments.settings("fig1_similarity_variability")  # only in the smoke profile
    cfg = experiments.load_config("fig1_similarity_variability", "default", device="cpu", clip_chars=100)
    assert cfg["clip_chars"] == 100


def test_cli_run_passes_sets_and_refuses_unknown_ones_before_a_kernel(monkeypatch, tmp_path, capsys):
    """`run SLUG --set` hands the parsed overrides to the notebook; an unknown key exits 2 with the
    known ones, before any kernel starts."""
    calls = []
    monkeypatch.setattr(experiments, "ensure_kernel", lambda: calls.append("kernel"))
    import papermill

    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: calls.append(k["parameters"]))
    rc = experiments.main(["run", "fig3_storage", "--profile", "smoke", "--device", "cpu", "--out", str(tmp_path),
                           "--set", "models=[smollm2-135m]", "--set", "conversations.n=2"])
    assert rc == 0 and calls[0] == "kernel"
    assert calls[1]["models"] == ["smollm2-135m"] and calls[1]["conversations"] == {"n": 2}
    assert calls[1]["profile"] == "smoke"
    calls.clear()
    rc = experiments.main(["run", "fig3_storage", "--device", "cpu", "--out", str(tmp_path), "--set", "bogus=1"])
    assert rc == 2 and calls == []
    assert "unknown parameter(s) 'bogus'; known: profile, device" in capsys.readouterr().err
