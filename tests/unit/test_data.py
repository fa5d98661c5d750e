"""Tests for krul.data: ids and splits, the JSONL reader, the truncated-JSON decoder, loading.

All fast and hermetic (tmp_path, hand-written JSONL) except the one marked `integration`, which
builds the real processed data from the installed packages into tmp_path.
"""
from __future__ import annotations

import json
import time

import pytest

from krul import data
from krul.data import Conversation, DataError


def _write(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines),
                    encoding="utf-8")
    return path


SHAREGPT_LINE = {"id": "abc_0", "conversations": [
    {"from": "system", "value": "Be brief."},
    {"from": "human", "value": "Hi"},
    {"from": "gpt", "value": "Hello"},
    {"from": "user", "value": "Again"},
    {"from": "bard", "value": "Sure"},
]}
MESSAGES_LINE = {"id": "abc_0", "messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Again"},
    {"role": "assistant", "content": "Sure"},
]}


# ---------------------------------------------------------------- ids, splits, order

def test_base_id_strips_only_a_trailing_part_number():
    """base_id drops a trailing _<digits> and leaves every other id unchanged."""
    assert data.base_id("36h2rUN_0") == "36h2rUN"
    assert data.base_id("36h2rUN_12") == "36h2rUN"
    assert data.base_id("a_b_3") == "a_b"
    assert data.base_id("mtbench-81") == "mtbench-81"
    assert data.base_id("x_y") == "x_y"
    assert data.base_id("_3") == "_3"


def test_split_is_stable_and_groups_parts_of_one_chat():
    """split_of is a pure function of the base id: repeatable, same for all parts, ~dev_fraction dev."""
    ids = [f"chat{i}" for i in range(2000)]
    first = [data.split_of(i) for i in ids]
    assert first == [data.split_of(i) for i in ids]
    for i in ids[:200]:
        assert {data.split_of(f"{i}_{k}") for k in range(5)} == {data.split_of(i)}
    dev_ratio = first.count("dev") / len(first)
    assert 0.26 < dev_ratio < 0.34
    assert {data.split_of(i, dev_fraction=0.0) for i in ids[:50]} == {"test"}
    assert {data.split_of(i, dev_fraction=1.0) for i in ids[:50]} == {"dev"}
    # pinned values: a change of the rule would silently move conversations between splits
    assert [data.split_of(i) for i in ("36h2rUN_0", "QWJhYvA_0", "mtbench-81", "mtbench-82")] == \
        ["test", "dev", "test", "dev"]


def test_split_rejects_a_fraction_outside_0_1():
    """split_of refuses dev_fraction outside [0, 1]."""
    with pytest.raises(DataError, match="dev_fraction"):
        data.split_of("a", dev_fraction=1.5)


def test_hash_key_sorts_parts_of_a_chat_together():
    """hash_key starts with the sha256 of the base id, so parts of one chat are adjacent in hash order."""
    ids = [f"c{i}_{k}" for i in range(50) for k in range(3)]
    ordered = sorted(ids, key=data.hash_key)
    bases = [data.base_id(i) for i in ordered]
    runs = [b for j, b in enumerate(bases) if j == 0 or bases[j - 1] != b]
    assert len(runs) == 50
    assert data.hash_key("c1_0") != data.hash_key("c1_1")
    assert data.hash_key("c1_0")[:64] == data.hash_key("c1_1")[:64]
    assert ordered != sorted(ids)  # not alphabetical


# ---------------------------------------------------------------- reader

def test_both_jsonl_shapes_parse_to_the_same_conversation(tmp_path):
    """A ShareGPT-shape line and a messages-shape line with the same content give equal conversations."""
    a = data.read_jsonl(_write(tmp_path / "a.jsonl", [SHAREGPT_LINE]))
    b = data.read_jsonl(_write(tmp_path / "b.jsonl", [MESSAGES_LINE]))
    assert [(c.id, c.messages, c.meta) for c in a] == [(c.id, c.messages, c.meta) for c in b]
    assert a[0].messages == MESSAGES_LINE["messages"]
    assert a[0].source == str(tmp_path / "a.jsonl")
    assert a[0].user_turn_indices() == [1, 3]


def test_read_jsonl_keeps_order_meta_and_skips_blank_lines(tmp_path):
    """Lines come back in file order with their meta; blank lines are ignored."""
    second = {"id": "z", "messages": [{"role": "user", "content": "q"}], "meta": {"category": "x"}}
    convs = data.read_jsonl(_write(tmp_path / "f.jsonl", [MESSAGES_LINE, "", "   ", second]))
    assert [c.id for c in convs] == ["abc_0", "z"]
    assert convs[1].meta == {"category": "x"}


def test_malformed_line_error_names_file_and_line(tmp_path):
    """A line that is not JSON raises DataError starting with '<path>:<lineno>:'."""
    path = _write(tmp_path / "bad.jsonl", [MESSAGES_LINE, '{"id": "x", "messages": [', MESSAGES_LINE])
    with pytest.raises(DataError) as err:
        data.read_jsonl(path)
    assert str(err.value).startswith(f"{path}:2: malformed JSON")


@pytest.mark.parametrize("record, expected", [
    ({"messages": [{"role": "user", "content": "q"}]}, "missing key 'id'"),
    ({"id": "x"}, "missing key 'conversations'"),
    ({"id": "x", "messages": [{"role": "user"}]}, "missing key 'content'"),
    ({"id": "x", "conversations": [{"from": "robot", "value": "q"}]}, "unknown role 'robot'"),
    ({"id": "x", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
     "message 1 .*empty content"),
    ({"id": "x", "messages": [{"role": "user", "content": "   \n"}]}, "message 0 .*empty content"),
    ({"id": "x", "messages": [{"role": "assistant", "content": "a"}]}, "first non-system message"),
    ({"id": "x", "messages": []}, "no messages"),
])
def test_bad_records_raise_with_file_and_line(tmp_path, record, expected):
    """Missing keys, unknown roles, empty content, a non-user opening: DataError with file:line."""
    path = _write(tmp_path / "f.jsonl", [MESSAGES_LINE, record])
    with pytest.raises(DataError, match=expected) as err:
        data.read_jsonl(path)
    assert str(err.value).startswith(f"{path}:2:")


def test_duplicate_ids_in_a_file_are_rejected(tmp_path):
    """The same id on two lines raises DataError naming both lines."""
    path = _write(tmp_path / "dup.jsonl", [MESSAGES_LINE, SHAREGPT_LINE])
    with pytest.raises(DataError, match=r":2: duplicate id 'abc_0' \(first on line 1\)"):
        data.read_jsonl(path)


def test_validate_conversation_names_id_and_message_index():
    """validate_conversation reports the conversation id and the index of an empty message."""
    conv = Conversation("c7", [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}],
                        source="test")
    with pytest.raises(DataError, match=r"'c7' message 1 .*empty"):
        data.validate_conversation(conv)
    with pytest.raises(DataError, match="first non-system message must be a user"):
        data.validate_conversation(Conversation(
            "c8", [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "test"))
    data.validate_conversation(Conversation("ok", [{"role": "user", "content": "q"}] * 2, "test"))


# ---------------------------------------------------------------- truncated JSON

def test_iter_json_array_stops_at_a_truncated_tail():
    """iter_json_array yields every complete element before the cut and reports the dropped tail."""
    full = json.dumps([{"id": "a", "v": [1, 2]}, {"id": "b", "v": "x, ] y"}, {"id": "c", "v": 3}],
                      indent=2)
    cut = full[: full.index('"c"') + 2]  # ends inside the third element's string
    tail = {}
    assert [e["id"] for e in data.iter_json_array(cut, tail)] == ["a", "b"]
    assert tail["truncated"] is True
    assert 0 < tail["n_chars_dropped"] < len(cut)
    complete = {}
    assert [e["id"] for e in data.iter_json_array(full, complete)] == ["a", "b", "c"]
    assert complete == {"truncated": False, "n_chars_dropped": 0}
    assert list(data.iter_json_array("  [ ")) == []
    assert list(data.iter_json_array("[1, 2,")) == [1, 2]


def test_iter_json_array_rejects_non_arrays():
    """Text that does not start with '[' raises DataError."""
    with pytest.raises(DataError, match="JSON array"):
        list(data.iter_json_array('{"id": 1}'))


# ---------------------------------------------------------------- load_conversations

def _convs_file(tmp_path, n=40):
    lines = [{"id": f"id{i}_{k}", "messages": [{"role": "user", "content": f"q{i}.{k}"},
                                               {"role": "assistant", "content": "a"}]}
             for i in range(n // 2) for k in range(2)]
    return _write(tmp_path / "convs.jsonl", lines)


def test_load_from_a_path_is_in_hash_order_then_limited(tmp_path):
    """A JSONL path loads without datasets, sorted by hash_key, and limit takes the first n of that order."""
    path = _convs_file(tmp_path)
    convs = data.load_conversations(str(path))
    keys = [data.hash_key(c.id) for c in convs]
    assert keys == sorted(keys) and len(convs) == 40
    assert [c.id for c in data.load_conversations(str(path), limit=5)] == [c.id for c in convs[:5]]


def test_load_filters_by_split_and_ids(tmp_path):
    """split keeps only that split (dev + test = all); ids keeps exactly those; missing ids raise."""
    path = str(_convs_file(tmp_path))
    dev = data.load_conversations(path, split="dev")
    test = data.load_conversations(path, split="test")
    assert {data.split_of(c.id) for c in dev} <= {"dev"} and {data.split_of(c.id) for c in test} <= {"test"}
    assert len(dev) + len(test) == 40
    picked = data.load_conversations(path, ids=["id3_1", "id0_0"])
    assert sorted(c.id for c in picked) == ["id0_0", "id3_1"]
    with pytest.raises(DataError, match="not in"):
        data.load_conversations(path, ids=["nope"])
    with pytest.raises(DataError, match="unknown split"):
        data.load_conversations(path, split="train")


def test_unknown_spec_lists_known_sets(tmp_path):
    """A spec that is neither a known set nor a file raises DataError naming sharegpt and mtbench."""
    with pytest.raises(DataError, match="known: sharegpt, mtbench"):
        data.load_conversations(str(tmp_path / "nowhere.jsonl"))


def test_missing_processed_set_says_how_to_build(tmp_path, monkeypatch):
    """Loading a known set before it is built says to run `make setup` or `krul data`."""
    monkeypatch.setenv("KRUL_DATA", str(tmp_path / "empty"))
    with pytest.raises(DataError, match="make setup.*krul data"):
        data.load_conversations("sharegpt")


def test_processed_set_loads_through_datasets_like_the_plain_reader(tmp_path, monkeypatch):
    """A processed file read via `datasets` gives the same conversations (meta without None) as read_jsonl."""
    pytest.importorskip("datasets")
    monkeypatch.setenv("KRUL_DATA", str(tmp_path))
    lines = [{"id": "mtbench-1", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
              "meta": {"category": "math", "references": ["r1", "r2"]}},
             {"id": "mtbench-2", "messages": [{"role": "user", "content": "c"}, {"role": "user", "content": "d"}],
              "meta": {"category": "writing"}}]
    _write(tmp_path / "mtbench.jsonl", lines)
    via_datasets = data.load_conversations("mtbench")
    plain = data.load_conversations(str(tmp_path / "mtbench.jsonl"))
    assert [(c.id, c.messages, c.meta) for c in via_datasets] == [(c.id, c.messages, c.meta) for c in plain]
    assert {c.source for c in via_datasets} == {"mtbench"}
    assert next(c for c in via_datasets if c.id == "mtbench-2").meta == {"category": "writing"}


def test_processed_set_loads_without_datasets(tmp_path, monkeypatch):
    """Without the `datasets` package (the GPU image) a processed set is read by the plain reader."""
    monkeypatch.setenv("KRUL_DATA", str(tmp_path))
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # makes `import datasets` fail
    _write(tmp_path / "sharegpt.jsonl", [MESSAGES_LINE])
    convs = data.load_conversations("sharegpt")
    assert [(c.id, c.source, c.messages) for c in convs] == [("abc_0", "sharegpt", MESSAGES_LINE["messages"])]


def test_sharegpt_filter_keeps_only_alternating_chats_of_four_or_more(tmp_path):
    """From a truncated ShareGPT-like array, only user-first strictly alternating chats with >= 4
    non-empty messages survive, and each drop is counted under its reason."""
    def chat(cid, roles, empty_at=None):
        return {"id": cid, "conversations": [{"from": r, "value": "" if k == empty_at else f"m{k}"}
                                             for k, r in enumerate(roles)]}
    entries = [chat("ok_0", ["human", "gpt", "human", "gpt"]),
               chat("ok2_0", ["user", "chatgpt", "human", "bing", "human"]),
               chat("short_0", ["human", "gpt"]),
               chat("sys_0", ["system", "human", "gpt", "human", "gpt"]),
               chat("twice_0", ["human", "human", "gpt", "gpt"]),
               chat("empty_0", ["human", "gpt", "human", "gpt"], empty_at=2),
               chat("robot_0", ["human", "robot", "human", "gpt"]),
               chat("ok_0", ["human", "gpt", "human", "gpt"])]
    text = json.dumps(entries, indent=1)
    path = tmp_path / "sg.json"
    path.write_text(text[:-30], encoding="utf-8")  # cut inside the last entry
    records, counts = data._sharegpt_conversations(path, progress=False)
    assert [r["id"] for r in records] == ["ok_0", "ok2_0"]
    assert records[1]["messages"][1] == {"role": "assistant", "content": "m1"}
    assert counts["entries_decoded"] == 7 and counts["kept"] == 2
    assert (counts["too_short"], counts["not_alternating"], counts["empty_message"],
            counts["unknown_role"]) == (1, 2, 1, 1)
    assert counts["truncated_source"] is True and counts["ending_with_user"] == 1


# ---------------------------------------------------------------- real build

@pytest.mark.integration
def test_build_real_data_counts_and_second_build_is_a_noop(tmp_path):
    """The real build keeps >5000 ShareGPT chats and all 80 MT-Bench questions (30 with GPT-4
    references); a second build returns the same manifest quickly without rewriting."""
    out = tmp_path / "processed"
    manifest = data.build(out_dir=out, progress=False)
    sg, mt = manifest["outputs"]["sharegpt"], manifest["outputs"]["mtbench"]
    assert manifest["format_version"] == data.FORMAT_VERSION
    assert sg["counts"]["entries_decoded"] > 17000
    assert sg["counts"]["kept"] > 5000
    assert sg["counts"]["truncated_source"] is True and sg["counts"]["n_chars_dropped"] < 100_000
    assert sg["n_dev"] + sg["n_test"] == sg["counts"]["kept"]
    assert 0.25 < sg["n_dev"] / sg["counts"]["kept"] < 0.35
    assert mt["counts"] == {**mt["counts"], "n": 80, "with_references": 30}
    assert mt["n_dev"] + mt["n_test"] == 80

    convs = data.read_jsonl(out / "sharegpt.jsonl")
    assert len(convs) == sg["counts"]["kept"]
    for c in convs:
        assert len(c.messages) >= 4
        assert [m["role"] for m in c.messages] == [("user", "assistant")[k % 2] for k in range(len(c.messages))]
    questions = data.read_jsonl(out / "mtbench.jsonl")
    assert all([m["role"] for m in q.messages] == ["user", "user"] for q in questions)
    with_refs = [q for q in questions if "references" in q.meta]
    assert len(with_refs) == 30 and all(len(q.meta["references"]) == 2 for q in with_refs)
    assert {q.meta["category"] for q in with_refs} == {"math", "reasoning", "coding"}

    mtime = (out / "sharegpt.jsonl").stat().st_mtime_ns
    t0 = time.perf_counter()
    again = data.build(out_dir=out, progress=False)
    assert time.perf_counter() - t0 < 5.0
    assert again == manifest
    assert (out / "sharegpt.jsonl").stat().st_mtime_ns == mtime
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
