"""A saved result is reused only under the stamp of what produced it (krul.stamps)."""
from krul.data import Conversation
from krul.stamps import conversations_digest, read_jsonl, record_digest, resume, stamp


def _conv(text: str, cid: str = "c1") -> Conversation:
    return Conversation(cid, [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}], "test")


def test_a_stamp_changes_with_each_ingredient(monkeypatch):
    base = {"policy": "krul(tau=0.1)", "calibration": record_digest({"tau": 0.1}),
            "conversations": conversations_digest([_conv("hi")])}
    s = stamp(base)
    assert stamp(dict(base)) == s  # deterministic
    assert stamp({**base, "policy": "krul(tau=0.2)"}) != s  # the resolved config
    assert stamp({**base, "calibration": record_digest({"tau": 0.2})}) != s  # the record's content
    assert stamp({**base, "conversations": conversations_digest([_conv("hello")])}) != s  # same id, other text
    monkeypatch.setattr("krul.evaluation.code_version", lambda: "edited")
    assert stamp(base) != s and stamp(base).startswith("edited-")  # the code version


def test_a_record_digest_ignores_when_and_where_it_was_written():
    rec = {"tau": 0.1, "grid": [1, 2], "runtime_s": 5.0, "provenance": {"git_sha": "a", "time": "t1"}}
    same = {**rec, "runtime_s": 9.0, "provenance": {"git_sha": "b", "time": "t2"}}
    assert record_digest(rec) == record_digest(same)
    assert record_digest(rec) != record_digest({**rec, "grid": [1, 3]})


def _key(g):
    return g["k"]


def test_the_same_stamp_resumes_and_another_recomputes_with_one_notice():
    saved = [{"k": 1, "stamp": "s1", "v": "old"}, {"k": 2, "stamp": "old"}, {"k": 1, "stamp": "s1", "v": "new"},
             {"k": 9, "stamp": "whatever"}]  # k 9: not in this run's grid, none of its business
    r = resume(saved, {1: "s1", 2: "s2", 3: "s3"}, _key)
    assert set(r.done) == {1} and r.done[1]["v"] == "new"  # the newest line of a point wins
    assert (r.stale, r.unstamped, r.adopted) == (1, 0, 0)
    notes = r.notices("x.partial.jsonl")
    assert len(notes) == 1 and notes[0].startswith("1 points were made by other code/settings: recomputing")
    # once recomputed (the stale line kept, the new one appended) it is not said again
    r = resume(saved + [{"k": 2, "stamp": "s2"}], {1: "s1", 2: "s2"}, _key)
    assert set(r.done) == {1, 2} and r.notices("x") == []


def test_unstamped_results_are_not_reused_unless_adopted_and_the_older_checks_still_guard():
    saved = [{"k": 1, "tau": 0.1}, {"k": 2, "tau": 0.5}, {"k": 3, "tau": 0.1, "stamp": "s3"}]
    expected = {1: "s1", 2: "s2", 3: "s3"}
    legacy = lambda g: g["tau"] == 0.1  # noqa: E731 - the older field check
    r = resume(saved, expected, _key, legacy)
    assert set(r.done) == {3} and r.unstamped == 1 and r.adopted == 0
    assert "--adopt-unstamped" in r.notices("f")[0]
    r = resume(saved, expected, _key, legacy, adopt_unstamped=True)
    assert set(r.done) == {1, 3} and r.adopted == 1 and r.unstamped == 0
    (note,) = r.notices("f", provenance="abc123")
    assert note.startswith("adopting 1 unstamped points from f") and "git abc123" in note
    # a stamped point of the same key beats an unstamped one
    r = resume(saved + [{"k": 1, "stamp": "s1", "v": 2}], expected, _key, legacy, adopt_unstamped=True)
    assert r.done[1]["v"] == 2 and r.adopted == 0


def test_read_jsonl_skips_a_line_cut_by_an_interruption(tmp_path):
    p = tmp_path / "a.partial.jsonl"
    p.write_text('{"k": 1}\n{"k": 2\n')
    assert read_jsonl(p) == [{"k": 1}] and read_jsonl(tmp_path / "none.jsonl") == []
