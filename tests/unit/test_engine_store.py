"""The engine and its store (tiny random chat model, CPU): a damaged or missing state is recomputed
(same greedy tokens as a full recompute, one warning per conversation), the disk tier's restore time
includes reading the file, and a disk store on a given folder carries conversations across engines."""
import os
import time
import warnings

import pytest
import torch

from krul.engine import Engine, StateFallbackWarning
from krul.restore import DiskSource
from krul.store import DiskStore, MissingStateError, make_store

N_NEW = 6
TURNS = [("Hello there, who are you?", "I am a small model."),
         ("Tell me about the sea.", "It is large and wet."),
         ("And the sky?", "Blue, mostly."),
         ("Thanks!", "You are welcome.")]


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(engine, conv_id, damage=None, turns=TURNS):
    """Teacher-forced turns; `damage(turn_idx)` runs before each turn > 0. Returns the results."""
    history, out = [], []
    for i, (user, reply) in enumerate(turns):
        if damage is not None and i > 0:
            damage(i)
        msg = {"role": "user", "content": user}
        out.append(engine.turn(conv_id, i, history, msg, reply=reply))
        history = history + [msg, {"role": "assistant", "content": reply}]
    return out


@pytest.fixture(scope="module")
def reference(tiny_chat):
    """Greedy tokens of every turn under full recompute (no stored KV to damage)."""
    engine = Engine(tiny_chat, "full-recompute", make_store("pageable"), max_new_tokens=N_NEW)
    return [r.generated_ids for r in _run(engine, "ref")]


def _flip(path, where):
    blob = bytearray(path.read_bytes())
    pos = {"header": 60, "body": len(blob) - 20}[where]
    blob[pos] ^= 0x55
    path.write_bytes(bytes(blob))


@pytest.mark.parametrize("damage", ["header", "body", "delete"])
def test_damaged_disk_state_is_recomputed_with_the_same_tokens(tiny_chat, reference, tmp_path, damage):
    """Every turn's state damaged (a flipped byte in the header or body, or the file deleted): each
    later turn recomputes, generates the full recompute's greedy tokens, and warns once."""
    store = DiskStore(tmp_path)
    engine = Engine(tiny_chat, "full-load", store, max_new_tokens=N_NEW)

    def hurt(_):
        path = store.path("c")
        assert path.exists()
        if damage == "delete":
            path.unlink()
        else:
            _flip(path, damage)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = _run(engine, "c", hurt)
    fallback_warnings = [w for w in caught if issubclass(w.category, StateFallbackWarning)]
    assert len(fallback_warnings) == 1 and "'c'" in str(fallback_warnings[0].message)
    assert [r.generated_ids for r in results] == reference
    assert engine.fallbacks == len(TURNS) - 1
    # a body that fails its sha256 while streaming is a StoreError saying "corrupted" (restore.py)
    expected = MissingStateError.__name__ if damage == "delete" else "corrupt"
    assert all(expected in r.fallback.lower() if damage != "delete" else expected in r.fallback
               for r in results[1:]) and not results[0].fallback
    assert all(r.history_tokens == 0 for r in results[1:])  # recomputed from the messages
    assert [e["turn_idx"] for e in engine.fallback_log] == [1, 2, 3]
    assert store.path("c").exists()  # the recomputed history was stored again


def test_one_damaged_turn_then_restores_again(tiny_chat, reference, tmp_path):
    """A single damaged state costs one recompute; the next turn restores the re-stored state."""
    store = DiskStore(tmp_path)
    engine = Engine(tiny_chat, "full-load", store, max_new_tokens=N_NEW)
    with pytest.warns(StateFallbackWarning):
        results = _run(engine, "c", lambda i: _flip(store.path("c"), "body") if i == 2 else None)
    assert [r.generated_ids for r in results] == reference
    assert engine.fallbacks == 1
    assert [bool(r.fallback) for r in results] == [False, False, True, False]
    assert results[1].history_tokens > 0 and results[3].history_tokens > 0


def test_one_warning_per_conversation(tiny_chat, tmp_path):
    store = DiskStore(tmp_path)
    engine = Engine(tiny_chat, "full-load", store, max_new_tokens=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for conv in ("a", "b"):
            _run(engine, conv, lambda i, conv=conv: store.path(conv).unlink(), turns=TURNS[:3])
    msgs = [str(w.message) for w in caught if issubclass(w.category, StateFallbackWarning)]
    assert len(msgs) == 2 and "'a'" in msgs[0] and "'b'" in msgs[1]
    assert engine.fallbacks == 4


def test_missing_memory_state_is_recomputed(tiny_chat, reference):
    """The memory tiers too: a state gone between turns is recomputed, not an error."""
    store = make_store("pageable")
    engine = Engine(tiny_chat, "full-load", store, max_new_tokens=N_NEW)
    with pytest.warns(StateFallbackWarning, match="MissingStateError"):
        results = _run(engine, "m", lambda i: store.delete("m") if i == 1 else None)
    assert [r.generated_ids for r in results] == reference
    assert engine.fallbacks == 1


@pytest.mark.parametrize("policy", ["partial-recompute", "minicache"])
def test_other_policies_fall_back_too(tiny_chat, tmp_path, policy):
    """A split or compressed state damaged: the recomputed turn is the full recompute's."""
    store = DiskStore(tmp_path)
    engine = Engine(tiny_chat, policy, store, max_new_tokens=N_NEW)
    with pytest.warns(StateFallbackWarning):
        results = _run(engine, "p", lambda i: _flip(store.path("p"), "body"), turns=TURNS[:2])
    ref = Engine(tiny_chat, "full-recompute", make_store("pageable"), max_new_tokens=N_NEW)
    assert results[1].generated_ids == _run(ref, "p", turns=TURNS[:2])[1].generated_ids


# -- timing --------------------------------------------------------------------------------------
def test_disk_restore_time_includes_reading_the_file(tiny_chat, tmp_path, monkeypatch):
    """The disk tier restores from the streamed file inside the timed region: a slow read shows in
    restore_s and ttft_s, and the restore's source is a `DiskSource`, not a state read beforehand."""
    store = DiskStore(tmp_path)
    engine = Engine(tiny_chat, "full-load", store, max_new_tokens=2)
    user0 = {"role": "user", "content": TURNS[0][0]}
    engine.turn("t", 0, [], user0, reply=TURNS[0][1])

    import krul.engine as engine_mod

    sources = []
    real_restore_into = engine_mod.restore_into

    def spy(adapter, source, cache, **kw):
        sources.append(source)
        return real_restore_into(adapter, source, cache, **kw)

    delay = 0.3
    real_preadv = os.preadv

    def slow_preadv(*args):
        time.sleep(delay)
        return real_preadv(*args)

    monkeypatch.setattr(engine_mod, "restore_into", spy)
    monkeypatch.setattr(os, "preadv", slow_preadv)
    history = [user0, {"role": "assistant", "content": TURNS[0][1]}]
    result = engine.turn("t", 1, history, {"role": "user", "content": TURNS[1][0]}, reply=TURNS[1][1])
    assert not result.fallback and result.history_tokens > 0
    assert len(sources) == 1 and isinstance(sources[0], DiskSource)
    assert result.restore_s >= delay and result.ttft_s >= result.restore_s
    assert result.restore_report["mode"].endswith("/pool")
    assert result.restore_report["read_s"] >= delay
    assert result.stored_bytes > 0 and result.loaded_stored_bytes > 0


def test_memory_restore_is_timed_from_the_store(tiny_chat, monkeypatch):
    """The memory tiers' get is inside the timed region too."""
    store = make_store("pageable")
    engine = Engine(tiny_chat, "full-load", store, max_new_tokens=2)
    user0 = {"role": "user", "content": TURNS[0][0]}
    engine.turn("t", 0, [], user0, reply=TURNS[0][1])
    real_get = store.get

    def slow_get(key):
        time.sleep(0.2)
        return real_get(key)

    monkeypatch.setattr(store, "get", slow_get)
    history = [user0, {"role": "assistant", "content": TURNS[0][1]}]
    result = engine.turn("t", 1, history, {"role": "user", "content": TURNS[1][0]}, reply=TURNS[1][1])
    assert result.restore_s >= 0.2 and result.history_tokens > 0


# -- persistence ---------------------------------------------------------------------------------
def test_a_fresh_engine_restores_what_another_stored(tiny_chat, reference, tmp_path):
    """Two engines (as two processes would) on one folder: B restores A's conversation."""
    a = Engine(tiny_chat, "full-load", make_store("disk", tmp_path), max_new_tokens=N_NEW)
    user0 = {"role": "user", "content": TURNS[0][0]}
    r0 = a.turn("x", 0, [], user0, reply=TURNS[0][1])
    del a
    b = Engine(tiny_chat, "full-load", make_store("disk", tmp_path), max_new_tokens=N_NEW)
    history = [user0, {"role": "assistant", "content": TURNS[0][1]}]
    r1 = b.turn("x", 1, history, {"role": "user", "content": TURNS[1][0]}, reply=TURNS[1][1])
    assert b.fallbacks == 0 and not r1.fallback
    assert r1.history_tokens > 0 and r1.stored_bytes > 0 and r1.restore_report["n_tokens"] == r1.history_tokens
    assert [r0.generated_ids, r1.generated_ids] == reference[:2]


@pytest.mark.parametrize("policy, expect", [("full-load", 1.0), ("int8", None)])
def test_turns_count_storage_bytes_at_two_bytes_per_element(tiny_chat, policy, expect):
    """TurnResult's storage bytes are the restored state's KV as a bf16 deployment stores it, whatever
    the compute dtype (fp32 here): full-load stores exactly its full KV; int8 keeps more than
    half of it here (short segments: partial groups pay whole scales), far from its fp32 quarter."""
    from krul.evaluation import summarize
    from krul.pricing import state_storage_bytes

    store = make_store("pageable")
    engine = Engine(tiny_chat, policy, store, max_new_tokens=2)
    seen = []
    get = store.get
    store.get = lambda key: seen.append(get(key)) or seen[-1]
    rows = _run(engine, "bytes", turns=TURNS[:3])
    assert rows[0].storage_bytes == 0 and all(r.storage_bytes > 0 for r in rows[1:])
    assert [r.storage_bytes for r in rows[1:]] == [state_storage_bytes(s) for s in seen]
    ratio = summarize(rows, "tiny", policy)["storage_ratio"]
    if expect is not None:
        assert ratio == pytest.approx(expect)
        assert all(r.full_storage_bytes * 2 == r.full_kv_bytes for r in rows[1:])  # fp32 = 2x bf16
    else:
        fp32 = sum(r.full_kv_bytes for r in rows[1:]) / sum(r.stored_bytes for r in rows[1:])
        assert 1.0 < ratio < 2.0 and fp32 > 1.5 * ratio  # short segments: partial groups cost scales
