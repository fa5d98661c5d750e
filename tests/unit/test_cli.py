"""The command line in-process: options refused before the model loads (one line, status 2), odd
conversation ids, `krul chat` surviving a too-long message, `--store DIR` carrying states and
chats across processes, the work shown on stderr (phases per turn, observed without changing the
engine's results), the documented JSONL example replayed, and `krul chat` streaming its reply and
saying when it was cut (a tiny random chat model stands in for SmolLM2)."""
import io
import json
import sys
from pathlib import Path

import pytest

from krul import cli, factory
from krul.store import TIERS, DiskStore

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "three_turns.jsonl"


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model is a test failure: validation must come first."""
    def refuse(*_a, **_k):
        raise AssertionError("the model was loaded before the options were validated")

    monkeypatch.setattr(factory, "_load_adapter", refuse)


@pytest.fixture
def tiny_model(monkeypatch, make_tiny_chat):
    """Engines built by the CLI get a tiny chat model (context `tiny_model.context`)."""
    holder = {"context": 1024}

    def load(model_name, device):
        assert device == "cpu"
        return make_tiny_chat(max_positions=holder["context"])

    monkeypatch.setattr(factory, "_load_adapter", load)
    return holder


def _inputs(monkeypatch, lines):
    it = iter(lines)

    def fake_input(prompt=""):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)


LONG_ID = "x" * 129


@pytest.mark.parametrize("argv,says", [
    (["replay", "--tier", "floppy"], "unknown tier 'floppy'"),
    (["chat", "--tier", "floppy"], "unknown tier"),
    (["evaluate", "--tier", "floppy"], "unknown tier"),
    (["replay", "--policy", "nope"], "unknown policy 'nope'; known: full-recompute"),
    (["chat", "--policy", "nope"], "unknown policy"),
    (["replay", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["chat", "--max-new-tokens", "-3"], "--max-new-tokens must be at least 1"),
    (["chat", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1, not 0"),
    (["evaluate", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["replay", "--recompute-ratio", "1.5"], "--recompute-ratio must be between 0 and 1"),
    (["replay", "--limit", "0"], "--limit must be at least 1"),
    (["replay", "--max-turns", "0"], "--max-turns must be at least 1"),
    (["replay", "--device", "tpu"], "unknown device 'tpu'"),
    (["replay", "--tier", "pinned", "--device", "cpu"], "--tier pinned needs CUDA"),
    (["replay", "--tier", "pageable", "--store", "DIR"], "--store keeps disk states; it needs --tier disk"),
    (["replay", "--model", "nope"], "known: smollm2-135m"),
    (["chat", "--conversation", "a/b"], "conversation id 'a/b' has characters other than"),
    (["chat", "--conversation", "..\\x"], "has characters other than"),
    (["chat", "--conversation", "tab\there"], "has characters other than"),
    (["chat", "--conversation", "nul\x00"], "has characters other than"),
    (["chat", "--conversation", ".."], "or only dots"),
    (["chat", "--conversation", ""], "has 0 characters"),
    (["chat", "--conversation", LONG_ID], "has 129 characters; use 1 to 128"),
    (["replay", "--ids", "ok", "no way"], "conversation id 'no way'"),
])
def test_bad_options_are_one_line_before_the_model_loads(no_model, capsys, tmp_path, argv, says):
    argv = [str(tmp_path) if a == "DIR" else a for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and err.startswith("krul: ") and err.count("\n") == 1, err
    assert "Traceback" not in err


def test_store_that_is_a_file_is_refused(no_model, capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert cli.main(["chat", "--store", str(f)]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


def test_good_ids_and_the_tier_list():
    from krul.engine import check_conversation_id

    for cid in ("chat", "ZBVAlqd_0", "mtbench-154", "user@example.com#3", "a" * 128, ".hidden"):
        assert check_conversation_id(cid) == cid
    assert factory.TIERS == TIERS


def test_chat_drops_a_message_too_long_for_the_context(tiny_model, monkeypatch, capsys):
    """A message that does not fit is reported and dropped; the conversation goes on."""
    tiny_model["context"] = 256
    _inputs(monkeypatch, ["hello", "word " * 100, "again", ""])
    assert cli.main(["chat", "--device", "cpu", "--max-new-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    assert out.count("model> ") == 2
    assert "context of 256" in err and "message dropped, the conversation continues" in err
    assert "Traceback" not in err
    second = [line for line in out.splitlines() if "history" in line][1]
    assert "history 0 tokens" not in second  # the third message continued from the first's state


def test_chat_with_store_resumes_in_a_later_process(tiny_model, monkeypatch, capsys, tmp_path):
    """`krul chat --store DIR --conversation ID` twice (as two processes would): the second run
    continues the conversation, restoring the first run's state instead of recomputing it."""
    argv = ["chat", "--device", "cpu", "--max-new-tokens", "3", "--store", str(tmp_path / "s"),
            "--conversation", "mine"]
    _inputs(monkeypatch, ["hello there", ""])
    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    assert "tier disk" in first and "resumed" not in first
    store = DiskStore(tmp_path / "s")
    assert "mine" in store
    assert len(json.loads(store.path("mine").with_suffix(".chat.json").read_text())) == 2

    _inputs(monkeypatch, ["and then?", ""])
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert "resumed after 1 turns" in out
    info = [line for line in out.splitlines() if "history" in line][0]
    assert "history 0 tokens" not in info and "recomputed" not in info and "Warning" not in err
    assert len(json.loads(store.path("mine").with_suffix(".chat.json").read_text())) == 4


def test_chat_with_store_recomputes_a_damaged_state(tiny_model, monkeypatch, capsys, tmp_path):
    argv = ["chat", "--device", "cpu", "--max-new-tokens", "3", "--store", str(tmp_path), "--conversation", "d"]
    _inputs(monkeypatch, ["hello there", ""])
    assert cli.main(argv) == 0
    path = DiskStore(tmp_path).path("d")
    path.write_bytes(path.read_bytes()[:-7])  # truncated
    _inputs(monkeypatch, ["and then?", ""])
    with pytest.warns(UserWarning, match="'d'"):
        assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "recomputed: the stored state could not be restored" in out and "model> " in out


def test_replay_with_store_leaves_the_state_for_another_engine(tiny_model, capsys, tmp_path, make_tiny_chat):
    """`krul replay --store DIR` keeps each conversation's last state; a fresh engine on DIR (a later
    process) continues from it without recomputing."""
    from krul.engine import Engine
    from krul.store import make_store

    msgs = [{"role": "user", "content": "Hi, who are you?"}, {"role": "assistant", "content": "A model."},
            {"role": "user", "content": "Nice. And the weather?"}, {"role": "assistant", "content": "Sunny."}]
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"id": "conv-1", "messages": msgs}) + "\n")
    root = tmp_path / "states"
    assert cli.main(["replay", "--device", "cpu", "--max-new-tokens", "2", "--conversations", str(f),
                     "--max-turns", "1", "--store", str(root), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(rows) == 1 and rows[0]["fallback"] == ""
    engine = Engine(make_tiny_chat(), "full-load", make_store("disk", root), max_new_tokens=2)
    result = engine.turn("conv-1", 1, msgs[:2], msgs[2], reply=msgs[3]["content"])
    assert engine.fallbacks == 0 and result.history_tokens > 0 and result.stored_bytes > 0


# -- the work shown: phases, progress, the example, streaming ------------------------------------

def test_chat_answers_fit_a_chat_and_replay_keeps_the_reference_length():
    """`krul chat`'s default reply length fits a chat answer; replay/evaluate keep 32 tokens."""
    assert cli.parser().parse_args(["chat"]).max_new_tokens == cli.CHAT_MAX_NEW_TOKENS == 256
    assert cli.parser().parse_args(["replay"]).max_new_tokens == 32
    assert cli.parser().parse_args(["evaluate"]).max_new_tokens == 32


def test_help_documents_the_conversation_format(capsys):
    """`krul replay --help` and `krul evaluate --help` show the JSONL format and name the example."""
    for command in ("replay", "evaluate"):
        with pytest.raises(SystemExit):
            cli.parser().parse_args([command, "--help"])
        out = capsys.readouterr().out
        assert '"messages"' in out and "user | assistant | system" in out
        assert "examples/three_turns.jsonl" in out and "docs/conversations.md" in out
    assert (REPO / "docs" / "conversations.md").is_file()


def test_the_example_is_three_turns_in_the_documented_format():
    """examples/three_turns.jsonl reads back as one conversation of three user turns, each answered."""
    from krul import data

    (conv,) = data.read_jsonl(EXAMPLE)
    assert len(conv.user_turn_indices()) == 3 and [m["role"] for m in conv.messages] == ["user", "assistant"] * 3
    assert f"--conversations {EXAMPLE.relative_to(REPO)}" in (REPO / "docs" / "conversations.md").read_text()


def test_replay_runs_the_example_and_shows_progress(tiny_model, capsys):
    """`krul replay --conversations examples/three_turns.jsonl` replays its three turns (JSON rows on
    stdout, each with its phase timings) while stderr shows the bars and the turns' phases."""
    assert cli.main(["replay", "--device", "cpu", "--conversations", str(EXAMPLE), "--max-new-tokens", "3",
                     "--policy", "int8", "--json"]) == 0
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["turn_idx"] for r in rows] == [0, 1, 2] and {r["conversation_id"] for r in rows} == {"lisbon-trip"}
    assert all({"restoring", "prefilling", "compressing", "storing"} <= set(r["phase_s"]) for r in rows)
    assert rows[1]["stored_bytes"] > 0
    assert "loading smollm2-135m" in err and "lisbon-trip" in err and "3/3" in err and "1/1" in err
    for phase in ("restoring", "prefilling", "decoding", "prefilling reply", "compressing", "storing"):
        assert phase in err, phase
    last = err.strip().splitlines()[-1]  # where the time went, per phase, median and range over turns
    assert last.startswith("krul: seconds per turn over 3 turns on cpu") and "compressing" in last


def test_no_progress_is_quiet(tiny_model, capsys):
    """--no-progress: nothing on stderr, the same table on stdout."""
    assert cli.main(["replay", "--device", "cpu", "--conversations", str(EXAMPLE), "--max-new-tokens", "2",
                     "--max-turns", "1", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.splitlines()[0].startswith("conversation_id") and "lisbon-trip" in out


def test_observing_the_phases_changes_nothing(tiny_chat):
    """TurnPhases sees krul-svd-loss score pairs and compress, times each phase, and leaves the turns'
    results (tokens, nll, stored bytes) and the engine's methods exactly as without it."""
    from krul import data
    from krul.engine import Engine
    from krul.estimator import AttentionEstimator
    from krul.factory import TurnPhases
    from krul.policies import get_policy
    from krul.store import make_store

    (conv,) = data.read_jsonl(EXAMPLE)
    policy = get_policy("krul-svd-loss").with_params(split="load", prior_weight=0.0,
                                                   selector_params={**get_policy("krul-svd-loss").selector_params, "tau": 0.0})

    def run(observe: bool):
        engine = Engine(tiny_chat, policy, make_store("pageable"), max_new_tokens=3,
                        estimator=AttentionEstimator(tiny_chat))
        seen, timings = [], []
        if not observe:
            return engine, [r.to_json() for r in engine.replay(conv)], seen, timings
        with TurnPhases(engine, on_phase=lambda ph, _: seen.append(ph)) as phases:
            rows = []
            for r in engine.replay(conv):
                rows.append(r.to_json())
                timings.append(dict(phases.last))
        return engine, rows, seen, timings

    engine, observed, seen, timings = run(True)
    _, plain, _, _ = run(False)
    keep = ("generated_text", "reply_nll_sum", "stored_bytes", "offloaded_bytes", "plan")
    assert [{k: r[k] for k in keep} for r in observed] == [{k: r[k] for k in keep} for r in plain]
    assert any(r["plan"].get("pairs") for r in observed)  # the svd-loss selector did pair layers
    assert {"restoring", "prefilling", "decoding", "scoring pairs", "compressing", "storing"} <= set(seen)
    assert all(t["scoring pairs"] > 0 and t["compressing"] > 0 for t in timings)
    assert not {"turn", "_restore", "_forward", "_sample", "put"} & (set(vars(engine)) | set(vars(engine.store)))
    assert engine.policy is policy and "build" not in vars(policy)


def _stdout(monkeypatch) -> io.StringIO:
    buf = io.StringIO()
    monkeypatch.setattr(sys, "stdout", buf)
    return buf


def test_chat_streams_its_reply_and_says_when_it_was_cut(tiny_model, monkeypatch):
    """The reply is on stdout before the turn's state is stored (streamed, not printed after), and a
    reply that hit --max-new-tokens says so."""
    out = _stdout(monkeypatch)
    at_put: list[str] = []
    real_build = cli.build_engine

    def build(args, **kw):
        engine = real_build(args, **kw)
        put = engine.store.put

        def spy(key, state):
            at_put.append(out.getvalue())
            return put(key, state)

        engine.store.put = spy
        return engine

    monkeypatch.setattr(cli, "build_engine", build)
    _inputs(monkeypatch, ["hello", ""])
    assert cli.main(["chat", "--device", "cpu", "--max-new-tokens", "4", "--no-progress"]) == 0
    text = out.getvalue()
    reply = text.split("model> ", 1)[1].split("\n", 1)[0]
    assert len(at_put) == 1 and f"model> {reply}" in at_put[0]  # streamed before the offload
    assert "[cut: the reply reached --max-new-tokens 4" in text


def test_chat_says_nothing_of_a_reply_that_ended(tiny_model, monkeypatch):
    """A reply that ends (an end-of-turn token) within the limit is not called cut."""
    out = _stdout(monkeypatch)
    real_build = cli.build_engine

    def build(args, **kw):
        engine = real_build(args, **kw)
        sample, eos = engine._sample, min(engine.eos_ids)
        calls = []

        def ends_early(logits):
            calls.append(1)
            return eos if len(calls) % 3 == 0 else sample(logits)

        engine._sample = ends_early
        return engine

    monkeypatch.setattr(cli, "build_engine", build)
    _inputs(monkeypatch, ["hello", ""])
    assert cli.main(["chat", "--device", "cpu", "--max-new-tokens", "8", "--no-progress"]) == 0
    assert "model> " in out.getvalue() and "cut" not in out.getvalue()


def test_trace_is_a_krul_subcommand_validated_before_the_model_loads(capsys):
    from krul.cli import main

    assert main(["trace", "-n", "0"]) == 2
    assert "n_conversations must be at least 1" in capsys.readouterr().err
