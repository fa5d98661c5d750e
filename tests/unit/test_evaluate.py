"""`krul evaluate` beside full-load: the ratio of the policy's nll to full-load's on the same
conversations with its paired bootstrap interval, full-load cached by content and code (a second
call does not recompute it; an edited conversation or source does), progress on stderr (a tiny
random chat model stands in for SmolLM2; $KRUL_HOME is a temporary folder)."""
import json
from pathlib import Path

import pytest

from krul import cli, evaluation, factory

pytestmark = pytest.mark.usefixtures("one_thread")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "three_turns.jsonl"


@pytest.fixture
def tiny(monkeypatch, make_tiny_chat, tmp_path):
    """Engines get a tiny chat model; caches live in a fresh $KRUL_HOME; full-load engines counted."""
    monkeypatch.setenv("KRUL_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(factory, "_load_adapter", lambda name, device: make_tiny_chat())
    built = []
    real = factory.build_engine

    def build(args, policy_name=None, adapter=None):
        built.append(policy_name or args.policy)
        return real(args, policy_name=policy_name, adapter=adapter)

    monkeypatch.setattr(factory, "build_engine", build)
    return built


def _evaluate(capsys, path, policy="int4", *extra):
    assert cli.main(["evaluate", "--device", "cpu", "--conversations", str(path), "--policy", policy,
                     "--max-new-tokens", "2", *extra]) == 0
    out, err = capsys.readouterr()
    return json.loads(out), err


def test_evaluate_reports_the_ratio_to_full_load_with_its_interval(tiny, capsys):
    """The summary holds full-load's nll and the ratio to it inside its paired bootstrap interval;
    stderr shows both runs' progress and says the ratio in words."""
    s, err = _evaluate(capsys, EXAMPLE)
    assert s["policy"] == "int4" and s["nll"] > 0 and s["full_load_nll"] > 0
    assert s["nll_ratio_to_full_load"] == pytest.approx(s["nll"] / s["full_load_nll"])
    lo, hi = s["nll_ratio_ci95"]
    assert lo <= s["nll_ratio_to_full_load"] <= hi
    assert s["full_load_cached_conversations"] == 0 and tiny == ["full-load", "int4"]
    assert "full-load (reference)" in err and "lisbon-trip" in err and "prefilling reply" in err
    assert f"ratio {s['nll_ratio_to_full_load']:.4f} (95% paired bootstrap" in err


def test_a_second_evaluate_reads_full_load_from_the_cache(tiny, capsys, tmp_path):
    """Same conversations, model and code: full-load is not run again and the numbers are the same;
    another policy on them reuses it too."""
    first, _ = _evaluate(capsys, EXAMPLE)
    second, err = _evaluate(capsys, EXAMPLE)
    assert tiny == ["full-load", "int4", "int4"]
    assert second["full_load_cached_conversations"] == 1 and "1 of 1 conversations from the cache" in err
    assert "full-load (reference)" not in err
    for key in ("full_load_nll", "nll_ratio_to_full_load", "nll_ratio_ci95", "greedy_match_rate"):
        assert second[key] == first[key], key
    third, _ = _evaluate(capsys, EXAMPLE, "int8")
    assert tiny[-1] == "int8" and "full-load" not in tiny[1:]
    assert third["full_load_nll"] == first["full_load_nll"]


def test_an_edited_conversation_or_source_recomputes_full_load(tiny, capsys, tmp_path, monkeypatch):
    """The cache key holds the conversation's content and the code version: an edit of either
    (the same id) runs full-load again."""
    _evaluate(capsys, EXAMPLE)
    record = json.loads(EXAMPLE.read_text())
    record["messages"][3]["content"] = "Baixa: the tram stops at Martim Moniz."
    edited = tmp_path / "edited.jsonl"
    edited.write_text(json.dumps(record) + "\n")
    s, err = _evaluate(capsys, edited)
    assert tiny.count("full-load") == 2 and s["full_load_cached_conversations"] == 0
    monkeypatch.setattr(evaluation, "code_version", lambda: "another-version")
    _evaluate(capsys, edited)
    assert tiny.count("full-load") == 3


def test_full_load_against_itself_is_one_and_fills_the_cache(tiny, capsys):
    """Evaluating full-load needs no second engine: its ratio is exactly 1, and a later policy's
    evaluation reads full-load's nll from the cache it filled."""
    s, _ = _evaluate(capsys, EXAMPLE, "full-load", "--max-new-tokens", "32")
    assert s["nll_ratio_to_full_load"] == 1.0 and s["nll_ratio_ci95"] == [1.0, 1.0] and tiny == ["full-load"]
    other, _ = _evaluate(capsys, EXAMPLE, "int8")
    assert tiny == ["full-load", "int8"] and other["full_load_nll"] == s["nll"]


def test_code_version_is_a_digest_of_the_source():
    """code_version: 16 hex digits, stable within a process."""
    v = evaluation.code_version()
    assert len(v) == 16 and int(v, 16) >= 0 and evaluation.code_version() == v


def test_without_scored_replies_the_summary_says_so():
    """No scored reply (MT-Bench, --history model): no ratio, and the line says why."""
    s = evaluation.with_full_load({"policy": "int4", "nll": None, "per_conversation": {"a": (0.0, 0)},
                                   "n_conversations": 1, "n_scored_tokens": 0}, {"a": (0.0, 0)}, 0)
    assert s["nll_ratio_to_full_load"] is None and s["full_load_nll"] is None
    assert "no real reply was scored" in evaluation.describe(s)


def test_greedy_references_are_keyed_by_content_and_code(monkeypatch):
    """A greedy reference's cache file changes with the conversation's content key and with the code
    version, so neither an edited conversation nor other code reads back an old reference."""
    path = evaluation._reference_path("m", "c1:abc", 0, "teacher")
    assert path == evaluation._reference_path("m", "c1:abc", 0, "teacher")
    assert path != evaluation._reference_path("m", "c1:abd", 0, "teacher")
    monkeypatch.setattr(evaluation, "code_version", lambda: "another-version")
    assert path != evaluation._reference_path("m", "c1:abc", 0, "teacher")
