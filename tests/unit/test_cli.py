"""The command line in-process: options refused before the model loads (one line, status 2), odd
conversation ids, `krul chat` surviving a too-long message, and `--store DIR` carrying states and
chats across processes (a tiny random chat model stands in for SmolLM2)."""
import json

import pytest

from krul import cli, factory
from krul.store import TIERS, DiskStore


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
