"""Budgets and tiers (`store.TieredStore`): LRU eviction, TTL, pinning against eviction, demotion down
the tiers and deletion past the last, the active tier, and full tiers (ENOSPC, RLIMIT_FSIZE) that warn
and go on; with the engine (tiny chat model), every deleted or dropped state is recomputed and the
greedy tokens are a full recompute's."""
import errno
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from krul.adapter import BufferCache
from krul.engine import Engine, StateFallbackWarning
from krul.store import (MissingStateError, StoreError, StoreSpaceWarning, TierSpec, TieredStore,
                        build_state, make_store, parse_budgets, serialize)

FP = {"model": "toy"}
N = 16
ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.usefixtures("one_thread")


def _state(seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    kv = [(torch.randn(1, 2, n, 8, generator=g), torch.randn(1, 2, n, 8, generator=g)) for _ in range(2)]
    return build_state(FP, torch.arange(n), kv, [0, 0], None)


SIZE = _state().nbytes()  # every test state's bytes (same shapes)


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _store(tmp_path, pageable=2 * SIZE, disk=None, clock=None):
    return TieredStore([TierSpec("pageable", pageable), TierSpec("disk", disk)], root=tmp_path, clock=clock)


def _same(a, b):
    return serialize(a) == serialize(b)


def _full(fd, data):
    """`os.write` on a full disk (the store's only writes are its state files)."""
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_bytes_are_the_states_real_bytes(tmp_path):
    """A memory tier counts StoredState.nbytes() (kv_bytes + 4 per token id); the disk tier the file."""
    store = _store(tmp_path, pageable=SIZE, disk=None)
    s = _state()
    assert SIZE == s.kv_bytes() + 4 * N
    store.put("a", s)
    assert store.used_bytes("pageable") == SIZE
    store.put("b", _state(1))  # a demoted to disk
    assert store.used_bytes("disk") == os.stat(store.disk.path("a")).st_size > SIZE


def test_lru_order_evicts_the_least_recently_used(tmp_path):
    """With room for two, a get refreshes a state: the third put evicts the one not used since."""
    clock = Clock()
    store = _store(tmp_path, clock=clock)
    for i, key in enumerate("ab"):
        clock.t = i
        store.put(key, _state(i))
    clock.t = 2
    store.get("a")
    clock.t = 3
    store.put("c", _state(2))
    assert store.keys("pageable") == ["a", "c"] and store.where("b") == "disk"
    assert _same(store.get("b"), _state(1))  # demoted intact
    assert store.counts["pageable"]["evictions"] == 1 and store.demotions == 1


def test_ttl_demotes_then_deletes_unused_states(tmp_path):
    """A state unused for longer than a tier's TTL moves down; past the last tier's TTL it is gone."""
    clock = Clock()
    store = TieredStore([TierSpec("pageable", None, 10.0), TierSpec("disk", None, 100.0)], root=tmp_path,
                        clock=clock)
    store.put("a", _state())
    store.put("b", _state(1))
    clock.t = 5
    store.get("b")
    clock.t = 11
    assert "a" in store and store.where("a") == "disk" and store.where("b") == "pageable"
    assert store.counts["pageable"]["expired"] == 1
    clock.t = 112
    assert "a" not in store and store.deletions == 1
    with pytest.raises(MissingStateError):
        store.get("a")


def test_a_pinned_conversation_is_never_evicted(tmp_path):
    """Pinned states stay in their tier through LRU pressure and TTL; unpinned, they are evicted."""
    clock = Clock()
    store = TieredStore([TierSpec("pageable", 2 * SIZE, 10.0), TierSpec("disk")], root=tmp_path, clock=clock)
    store.put("p", _state())
    store.pin("p")
    for i, key in enumerate("abcd"):
        clock.t = i + 1
        store.put(key, _state(i + 1))
    clock.t = 100
    assert "p" in store and store.where("p") == "pageable"
    store.unpin("p")
    store.put("e", _state(9))
    assert store.where("p") == "disk"


def test_a_state_that_cannot_fit_around_pinned_ones_goes_down(tmp_path):
    """Two pinned states fill the tier: the next state goes to the next tier, the pinned stay."""
    store = _store(tmp_path)
    for key in "ab":
        store.put(key, _state())
        store.pin(key)
    store.put("c", _state(2))
    assert store.keys("pageable") == ["a", "b"] and store.where("c") == "disk"


def test_demotion_chain_ends_in_deletion(tmp_path):
    """pageable -> disk -> deleted: each eviction moves a state one tier down; past the last it is gone."""
    store = _store(tmp_path, pageable=SIZE, disk=int(1.5 * SIZE) + 2048)
    store.put("a", _state(0))
    assert store.where("a") == "pageable"
    store.put("b", _state(1))
    assert store.where("a") == "disk" and store.where("b") == "pageable"
    store.put("c", _state(2))
    assert store.where("a") is None and store.where("b") == "disk" and store.where("c") == "pageable"
    assert not store.disk.path("a").exists()
    assert (store.demotions, store.deletions) == (2, 1)
    assert store.stats()["tiers"]["disk"]["n_states"] == 1


def test_a_state_larger_than_every_budget_is_dropped(tmp_path):
    """A state no tier's budget can hold is dropped (counted): the conversation is recomputed."""
    store = _store(tmp_path, pageable=SIZE // 2, disk=SIZE // 2)
    assert store.put("a", _state()) == 0
    assert "a" not in store and store.dropped == 1


def test_enospc_warns_and_goes_to_the_next_tier_or_drops(tmp_path, monkeypatch):
    """A full disk (ENOSPC injected) is a StoreSpaceWarning, never an exception: a demotion onto it
    deletes the state, a put onto it drops it; memory tiers above keep working."""
    store = _store(tmp_path, pageable=SIZE)
    monkeypatch.setattr(os, "write", _full)
    store.put("a", _state(0))
    with pytest.warns(StoreSpaceWarning, match="disk tier could not store"):
        store.put("b", _state(1))  # a demoted onto the full disk: deleted
    assert store.where("a") is None and store.where("b") == "pageable"
    assert store.counts["disk"]["full_errors"] == 1 and store.dropped == 1
    assert not list(tmp_path.glob("*.tmp"))
    monkeypatch.undo()
    store.put("c", _state(2))
    assert store.where("b") == "disk"  # the disk works again


def test_enospc_on_a_disk_only_store_drops_with_one_warning(tmp_path, monkeypatch):
    """Every put onto a full disk is dropped, warned about once (per tier and error kind)."""
    store = TieredStore([TierSpec("disk")], root=tmp_path)
    monkeypatch.setattr(os, "write", _full)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for key in "abc":
            assert store.put(key, _state()) == 0
    assert len([w for w in caught if issubclass(w.category, StoreSpaceWarning)]) == 1
    assert "recomputed" in str(caught[0].message) and store.dropped == 3


def test_file_size_limit_warns_and_drops_in_a_subprocess(tmp_path):
    """Under RLIMIT_FSIZE (SIGXFSZ ignored) a state too big for the file limit is dropped with a
    warning; the process goes on and stores a small state."""
    code = """
    import resource, signal, sys, warnings, torch
    from krul.store import TierSpec, TieredStore, StoreSpaceWarning, build_state
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    def state(n):
        kv = [(torch.randn(1, 8, n, 128), torch.randn(1, 8, n, 128)) for _ in range(4)]
        return build_state({"model": "big"}, torch.arange(n), kv, [0] * 4, None)
    store = TieredStore([TierSpec("pageable", 1 << 17), TierSpec("disk")], root=sys.argv[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        print("BIG", store.put("big", state(64)), store.where("big"))
    print("WARN", [str(w.message)[:60] for w in caught if w.category is StoreSpaceWarning])
    print("SMALL", store.put("small", state(2)) > 0, store.where("small"))
    """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code), str(tmp_path)], env=ENV,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "BIG 0 None" in out.stdout and "disk tier could not store" in out.stdout, out.stdout
    assert "SMALL True pageable" in out.stdout
    assert not list(tmp_path.glob("*.tmp"))


def test_active_tier_keeps_live_caches_within_its_budget(tmp_path):
    """keep_active counts the cache's buffer bytes; the LRU cache is dropped past the budget (its
    state stays below); take_active hands back (state, cache) once."""
    caches = {k: BufferCache(2, 2, 8, N, torch.float32, "cpu") for k in "abc"}
    nb = caches["a"].nbytes()
    store = TieredStore([TierSpec("active", 2 * nb), TierSpec("pageable")])
    for key in "abc":
        store.put(key, _state())
        assert store.keep_active(key, caches[key])
    assert store.keys("active") == ["b", "c"] and store.used_bytes("active") == 2 * nb
    assert store.take_active("a") is None and "a" in store
    state, cache = store.take_active("b")
    assert cache is caches["b"] and _same(state, _state())
    assert store.take_active("b") is None and store.counts["active"]["hits"] == 1


def test_bad_tiers_and_budgets_are_clear_errors():
    with pytest.raises(StoreError, match="unknown tier"):
        TierSpec("gpu")
    with pytest.raises(StoreError, match="storage tier below"):
        TieredStore([TierSpec("active")])
    assert parse_budgets("active=0,pageable=64MiB,disk=none") == {"active": 0, "pageable": 64 << 20,
                                                                    "disk": None}
    with pytest.raises(StoreError, match="TIER=BYTES"):
        parse_budgets("ram=1G")


# -- with the engine: deletions and drops cost time, never a token ----------------------------------
TURNS = [("Hello there, who are you?", "I am a small model."),
         ("Tell me about the sea.", "It is large and wet."),
         ("And the sky?", "Blue, mostly."),
         ("Thanks!", "You are welcome.")]
N_NEW = 6


def _interleaved(engine, conv_ids):
    """Every conversation's turn i, then turn i+1 ...: each offload pressures the others' states."""
    out = {c: [] for c in conv_ids}
    history = {c: [] for c in conv_ids}
    for i, (user, reply) in enumerate(TURNS):
        for c in conv_ids:
            msg = {"role": "user", "content": f"{c}: {user}"}
            out[c].append(engine.turn(c, i, history[c], msg, reply=reply))
            history[c] = history[c] + [msg, {"role": "assistant", "content": reply}]
    return out


@pytest.fixture(scope="module")
def reference(tiny_chat):
    engine = Engine(tiny_chat, "full-recompute", make_store("pageable"), max_new_tokens=N_NEW)
    return {c: [r.generated_ids for r in rs] for c, rs in _interleaved(engine, "xyz").items()}


def test_deleted_states_fall_back_with_the_full_recomputes_tokens(tiny_chat, reference, tmp_path):
    """Budgets for about one state per tier, three conversations interleaved: states are demoted and
    deleted, those turns recompute (one warning per conversation), and every greedy token equals the
    full recompute's."""
    full = 4 * 2 * 2 * 16 * 4  # one token's K and V over 4 layers, 2 kv heads x head_dim 16, fp32
    store = TieredStore([TierSpec("pageable", 80 * full), TierSpec("disk", 100 * full)], root=tmp_path)
    engine = Engine(tiny_chat, "full-load", store, max_new_tokens=N_NEW)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _interleaved(engine, "xyz")
    assert {c: [r.generated_ids for r in rs] for c, rs in got.items()} == reference
    assert store.demotions > 0 and store.deletions > 0 and engine.fallbacks > 0
    assert sum(bool(r.fallback) for rs in got.values() for r in rs) == engine.fallbacks
    assert sum(r.history_tokens > 0 for rs in got.values() for r in rs) > 0  # some restored
    warned = [str(w.message) for w in caught if issubclass(w.category, StateFallbackWarning)]
    assert len(warned) == len({e["conversation_id"] for e in engine.fallback_log})


def test_a_full_disk_under_the_engine_costs_no_token(tiny_chat, reference, tmp_path, monkeypatch):
    """ENOSPC on every disk write while conversations demote onto the disk: warnings, recomputes,
    the full recompute's tokens, no exception."""
    monkeypatch.setattr(os, "write", _full)
    full = 4 * 2 * 2 * 16 * 4
    store = TieredStore([TierSpec("pageable", 80 * full), TierSpec("disk")], root=tmp_path)
    engine = Engine(tiny_chat, "full-load", store, max_new_tokens=N_NEW)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _interleaved(engine, "xyz")
    assert {c: [r.generated_ids for r in rs] for c, rs in got.items()} == reference
    assert store.counts["disk"]["full_errors"] > 0 and engine.fallbacks > 0
    assert any(issubclass(w.category, StoreSpaceWarning) for w in caught)


def test_active_tier_restores_for_free_with_the_same_tokens(tiny_chat, reference):
    """With an active tier the next turn takes the live cache (no restore report, history kept) and
    the tokens are a full recompute's; with a budget for one cache the others restore from below."""
    store = TieredStore([TierSpec("active", None), TierSpec("pageable")])
    engine = Engine(tiny_chat, "full-load", store, max_new_tokens=N_NEW)
    got = _interleaved(engine, "xyz")
    assert {c: [r.generated_ids for r in rs] for c, rs in got.items()} == reference
    assert all(r.history_tokens > 0 and not r.restore_report for rs in got.values() for r in rs[1:])
    assert store.counts["active"]["hits"] == 9 and store.counts["pageable"]["hits"] == 0
    small = TieredStore([TierSpec("active", 1), TierSpec("pageable")])
    engine = Engine(tiny_chat, "full-load", small, max_new_tokens=N_NEW)
    got = _interleaved(engine, "xyz")
    assert {c: [r.generated_ids for r in rs] for c, rs in got.items()} == reference
    assert small.counts["active"]["hits"] == 0 and small.counts["pageable"]["hits"] == 9
