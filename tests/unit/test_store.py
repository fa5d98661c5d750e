"""Stored states: byte accounting, layouts across turns, integrity and the tiers (tensors only)."""
import pytest
import torch

from krul.store import (DiskStore, ExactLayer, MemoryStore, StoreError, build_state, check_fingerprint,
                        deserialize, make_store, serialize)
from krul.restore import load_layers

FP = {"model": "toy", "dtype": "float32"}


def _kv(n_layers=4, n=10, heads=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, heads, n, dim, generator=g), torch.randn(1, heads, n, dim, generator=g))
            for _ in range(n_layers)]


def test_full_load_state_round_trips_exactly():
    """A state with no pairs and no recompute loads back every layer's KV bit for bit."""
    kv = _kv()
    state = build_state(FP, torch.arange(10), kv, [0] * 4, None)
    loaded = load_layers(state, torch.device("cpu"))
    for (k, v), (k2, v2) in zip(kv, loaded):
        assert torch.equal(k, k2) and torch.equal(v, v2)
    assert state.kv_bytes() == sum(k.numel() * 4 * 2 for k, _ in kv)


def test_pyramid_state_stores_only_loaded_tokens():
    """Tokens [0:L_l] of layer l are not stored; the rest tiles [L_l, N) exactly."""
    kv = _kv()
    lengths = [6, 4, 2, 0]
    state = build_state(FP, torch.arange(10), kv, lengths, None)
    state.check_coverage()
    loaded = load_layers(state, torch.device("cpu"))
    for l, ((k, _), part) in enumerate(zip(kv, loaded)):
        assert torch.equal(part[0], k[:, :, lengths[l]:])
    assert state.kv_bytes() == sum((10 - n) * 2 * 8 * 4 * 2 for n in lengths)


def test_segments_accumulate_and_gaps_are_filled_exactly():
    """A second turn keeps old items, adds the new segment, and fills gaps when L_l shrinks."""
    kv1 = _kv(n=10)
    s1 = build_state(FP, torch.arange(10), kv1, [4, 4, 2, 2], None)
    kv2 = [(torch.cat([k, k2], 2), torch.cat([v, v2], 2)) for (k, v), (k2, v2) in zip(kv1, _kv(n=5, seed=1))]
    s2 = build_state(FP, torch.arange(15), kv2, [1, 1, 1, 0], s1)
    s2.check_coverage()
    loaded = load_layers(s2, torch.device("cpu"))
    for l, n in enumerate([1, 1, 1, 0]):
        assert torch.equal(loaded[l][0], kv2[l][0][:, :, n:])


def test_disk_tier_round_trip_and_corruption_detected(tmp_path):
    """The disk tier reads back what it wrote; a flipped byte is an integrity error, not wrong KV."""
    store = DiskStore(tmp_path)
    state = build_state(FP, torch.arange(10), _kv(), [0] * 4, None)
    store.put("c/1", state)
    back = store.get("c/1")
    assert torch.equal(back.token_ids, state.token_ids)
    assert back.kv_bytes() == state.kv_bytes()
    path = store.path("c/1")
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(StoreError, match="checksum"):
        store.get("c/1")
    with pytest.raises(StoreError, match="no stored state"):
        store.get("missing")


def test_serialize_rejects_garbage():
    """A file that is not a krul state is refused with a clear error."""
    with pytest.raises(StoreError, match="not a krul state"):
        deserialize(b"hello")


def test_fingerprint_mismatch_is_an_error():
    """Restoring into another model names the differing fields."""
    state = build_state(FP, torch.arange(10), _kv(), [0] * 4, None)
    with pytest.raises(StoreError, match="model"):
        check_fingerprint(state, {"model": "other", "dtype": "float32"})


def test_pageable_store_owns_its_memory():
    """Writing into the live cache after offload does not change the stored state."""
    kv = _kv()
    store = MemoryStore()
    store.put("c", build_state(FP, torch.arange(10), kv, [0] * 4, None))
    kv[0][0].zero_()
    assert store.get("c").items_for_layer(0)[0].payload.keys.abs().sum() > 0


def test_pinned_tier_needs_cuda():
    """The pinned tier without CUDA is a clear error."""
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(StoreError, match="CUDA"):
        make_store("pinned")


def test_compressed_pairs_in_state_count_their_bytes():
    """A merged pair is stored once with its extras, and expands to both layers."""
    kv = _kv()
    state = build_state(FP, torch.arange(10), kv, [0] * 4, None, pairs=[(2, 3)], method="merge",
                        compress_kwargs={"retain_ratio": 0.0})
    pair_items = [it for it in state.items if it.layers == (2, 3)]
    assert len(pair_items) == 1
    assert state.kv_bytes() == sum(it.payload.nbytes() for it in state.items)
    assert state.kv_bytes() < sum(k.numel() * 4 * 2 for k, _ in kv)
    loaded = load_layers(state, torch.device("cpu"))
    assert loaded[3][0].shape == kv[3][0].shape


def test_svd_segments_keep_the_sink_once_and_survive_the_disk_tier(tmp_path):
    """Per-segment svd: turn 1's segment keeps absolute position 0 exact, turn 2's new segment
    (offset 10) keeps none, the old segment stays as stored, and the disk tier reads it all back."""
    kv1 = _kv(n=10)
    s1 = build_state(FP, torch.arange(10), kv1, [0] * 4, None, pairs=[(1, 3)], method="svd",
                     compress_kwargs={"rank_ratio": 0.5, "sink_tokens": 1})
    kv2 = [(torch.cat([k, k2], 2), torch.cat([v, v2], 2)) for (k, v), (k2, v2) in zip(kv1, _kv(n=6, seed=1))]
    s2 = build_state(FP, torch.arange(16), kv2, [0] * 4, s1, pairs=[(1, 3)], method="svd",
                     compress_kwargs={"rank_ratio": 0.5, "sink_tokens": 1})
    segs = sorted((it.start, it.payload.data["retain_idx"].tolist()) for it in s2.items if it.layers == (1, 3))
    assert segs == [(0, [0]), (10, [])]
    old = [it for it in s1.items if it.layers == (1, 3)][0].payload
    kept = [it for it in s2.items if it.layers == (1, 3) and it.start == 0][0].payload
    assert torch.equal(kept.data["k_coef"], old.data["k_coef"])  # never re-compressed
    loaded = load_layers(s2, torch.device("cpu"))
    assert torch.equal(loaded[1][0][:, :, 0], kv2[1][0][:, :, 0])
    assert torch.equal(loaded[0][0], kv2[0][0]) and torch.equal(loaded[2][1], kv2[2][1])
    store = DiskStore(tmp_path)
    store.put("c/2", s2)
    back = load_layers(store.get("c/2"), torch.device("cpu"))
    for l in range(4):
        assert torch.equal(back[l][0], loaded[l][0]) and torch.equal(back[l][1], loaded[l][1])
    assert store.get("c/2").kv_bytes() == s2.kv_bytes()


def _packed_state(method="svd", lengths=(3, 2, 1, 0), kv=None):
    kv = kv or _kv()
    kwargs = {"svd": {"rank_ratio": 0.5, "retain_ratio": 0.2}, "merge": {"retain_ratio": 0.2}, "share": {}}[method]
    return build_state(FP, torch.arange(10), kv, list(lengths), None, pairs=[(1, 3)], method=method,
                       compress_kwargs=kwargs)


@pytest.mark.parametrize("method", ["share", "merge", "svd"])
def test_packed_store_lays_each_item_out_as_its_staging_buffer(method):
    """MemoryStore(pack=True) keeps every tensor (dtype, shape, values) as a view of one blob per item,
    at `packed_layout` offsets in sorted name order, and kv_bytes() is unchanged."""
    from krul.store import ALIGN, packed_layout

    state = _packed_state(method)
    store = MemoryStore(pack=True)
    assert store.pack and not store.pinned and store.tier == "pageable"
    store.put("c", state)
    packed = store.get("c")
    assert packed.kv_bytes() == state.kv_bytes() and packed.nbytes() == state.nbytes()
    for before, after in zip(state.items, packed.items):
        assert type(after.payload) is type(before.payload) and after.payload.meta() == before.payload.meta()
        old, new = before.payload.tensors(), after.payload.tensors()
        names = sorted(new)
        assert names == sorted(old)
        offsets, total = packed_layout([new[n].numel() * new[n].element_size() for n in names])
        assert all(o % ALIGN == 0 for o in offsets) and total % ALIGN == 0
        base = new[names[0]].data_ptr()
        for name, off in zip(names, offsets):
            t = new[name]
            assert t.dtype == old[name].dtype and t.shape == old[name].shape and torch.equal(t, old[name])
            assert t.is_contiguous() and not t.is_pinned()
            assert t.untyped_storage().data_ptr() == new[names[0]].untyped_storage().data_ptr()
            assert t.data_ptr() - base == off
        assert new[names[0]].untyped_storage().nbytes() == total


def test_packed_store_owns_its_memory_and_default_packing_follows_the_tier():
    """A packed item copies the live cache (later writes do not reach it); only the pinned tier packs
    by default."""
    kv = _kv()
    store = MemoryStore(pack=True)
    store.put("c", build_state(FP, torch.arange(10), kv, [0] * 4, None))
    kv[0][0].zero_()
    assert store.get("c").items_for_layer(0)[0].payload.keys.abs().sum() > 0
    assert not MemoryStore().pack and not MemoryStore(pinned=False, pack=False).pack
