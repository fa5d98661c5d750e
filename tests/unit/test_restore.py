"""Restore executor: exactness against a plain forward, every source, the cache it fills (CPU, tiny models)."""
import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, Qwen2Config

from krul.adapter import ModelAdapter
from krul.restore import (BufferCache, DiskSource, HostPool, load_layers, recompute_into, restore,
                          restore_cache, restore_into)
from krul.store import DiskStore, MemoryStore, StoreError, build_state

N = 40


pytestmark = pytest.mark.usefixtures("one_thread")


def _adapter(kind="llama", layers=4, seed=0):
    cls = LlamaConfig if kind == "llama" else Qwen2Config
    cfg = cls(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    return ModelAdapter(model, name=f"tiny-{kind}-{layers}")


@pytest.fixture(scope="module")
def tiny():
    """(adapter, ids (1, N), reference per-layer KV of a plain forward over ids)."""
    adapter = _adapter()
    ids = torch.randint(0, 128, (1, N), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        cache = DynamicCache()
        adapter.model(input_ids=ids, past_key_values=cache, use_cache=True)
    return adapter, ids, [(k.clone(), v.clone()) for k, v in adapter.kv_from_cache(cache)]


LENGTHS = {"all-load": [0, 0, 0, 0], "all-recompute": [N] * 4, "pyramid": [30, 21, 9, 0],
           "uneven": [N, 25, 25, 3]}


def _max_err(layers, ref, n=N):
    return max(float((a[:, :, :n] - b).abs().max()) for (k, v), (rk, rv) in zip(layers, ref)
               for a, b in ((k, rk), (v, rv)))


@pytest.mark.parametrize("name", list(LENGTHS))
def test_restore_equals_plain_forward(tiny, name):
    """restore() of a state with lengths all 0 / all N / a pyramid gives the plain forward's KV (1e-5)."""
    adapter, ids, ref = tiny
    state = build_state(adapter.fingerprint(), ids[0], ref, LENGTHS[name], None)
    layers, report = restore(adapter, state)
    assert all(k.shape == ref[0][0].shape for k, _ in layers)
    assert _max_err(layers, ref) < 1e-5
    assert report.n_tokens == N and report.recomputed_tokens == sum(LENGTHS[name])


def test_full_load_is_bit_identical(tiny):
    """A full-load restore reproduces the stored KV bit for bit (the engine's losslessness)."""
    adapter, ids, ref = tiny
    state = build_state(adapter.fingerprint(), ids[0], ref, [0] * 4, None)
    layers, report = restore(adapter, state)
    assert all(torch.equal(k, rk) and torch.equal(v, rv) for (k, v), (rk, rv) in zip(layers, ref))
    assert report.loaded_bytes == state.kv_bytes()


def test_all_recompute_is_bit_identical_to_forward(tiny):
    """Recomputing every token layer by layer gives exactly the forward's KV."""
    adapter, ids, ref = tiny
    state = build_state(adapter.fingerprint(), ids[0], ref, [N] * 4, None)
    layers, _ = restore(adapter, state)
    assert all(torch.equal(k, rk) and torch.equal(v, rv) for (k, v), (rk, rv) in zip(layers, ref))


@pytest.mark.parametrize("tier", ["pageable", "disk"])
def test_restore_mode_says_none_when_nothing_is_loaded(tiny, tmp_path, tier):
    """With every token recomputed no source is read: the mode says 'none', not the tier's path."""
    adapter, ids, ref = tiny
    state = build_state(adapter.fingerprint(), ids[0], ref, [N] * 4, None)
    source = state
    if tier == "disk":
        store = DiskStore(tmp_path)
        store.put("c", state)
        source = DiskSource(store.path("c"))
    cache = BufferCache.for_adapter(adapter, N)
    report = restore_into(adapter, source, cache)
    assert report.mode.endswith("/none") and report.loaded_bytes == 0
    partial = build_state(adapter.fingerprint(), ids[0], ref, [N, 25, 25, 3], None)
    assert not restore_into(adapter, partial, cache).mode.endswith("/none")


@pytest.mark.parametrize("tier", ["pageable", "disk"])
@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("name", ["pyramid", "uneven"])
def test_restore_into_buffers_from_every_source(tiny, tmp_path, tier, overlap, name):
    """restore_into a larger BufferCache from memory or a state file writes every history token."""
    adapter, ids, ref = tiny
    state = build_state(adapter.fingerprint(), ids[0], ref, LENGTHS[name], None)
    if tier == "disk":
        store = DiskStore(tmp_path)
        store.put("c", state)
        source = DiskSource(store.path("c"))
    else:
        store = MemoryStore()
        store.put("c", state)
        source = store.get("c")
    cache = BufferCache.for_adapter(adapter, N + 7).fill_(float("nan"))
    report = restore_into(adapter, source, cache, overlap=overlap)
    assert cache.get_seq_length() == N and all(layer.length == N for layer in cache.layers)
    assert _max_err(cache.kv(), ref) < 1e-5
    assert report.mode.split("/")[1] == ("pool" if tier == "disk" else "direct")
    assert report.restore_s > 0


def test_pool_pipeline_with_items_spanning_chunks(tiny, tmp_path):
    """Streaming a state file through 2 tiny slots (items cut across many chunks) is still exact."""
    adapter, ids, ref = tiny
    state = build_state(adapter.fingerprint(), ids[0], ref, [12, 6, 0, 0], None)
    store = DiskStore(tmp_path)
    store.put("c", state)
    cache = BufferCache.for_adapter(adapter, N).fill_(float("nan"))
    report = restore_into(adapter, DiskSource(store.path("c")), cache, pool=HostPool(2, 4096, pin=False),
                          n_readers=2, timeline=True)
    assert _max_err(cache.kv(), ref) < 1e-5
    assert report.hash_s >= 0 and report.read_s > 0
    assert {e[0] for e in report.events} >= {"read", "h2d", "place", "recompute"}


def test_compressed_pairs_restore_like_reference_loader(tiny, tmp_path):
    """Merged and shared pairs expand into the buffers exactly as `load_layers` expands them."""
    adapter, ids, ref = tiny
    for method, kwargs in (("merge", {"retain_ratio": 0.1}), ("share", {})):
        state = build_state(adapter.fingerprint(), ids[0], ref, [20, 10, 5, 0], None, pairs=[(1, 3)],
                            method=method, compress_kwargs=kwargs)
        expected = load_layers(state, torch.device("cpu"))
        store = DiskStore(tmp_path)
        store.put(method, state)
        for source in (state, DiskSource(store.path(method))):
            cache = BufferCache.for_adapter(adapter, N).fill_(float("nan"))
            restore_into(adapter, source, cache)
            for layer_idx, (k, v) in enumerate(cache.kv()):
                begin = state.recompute_lengths[layer_idx]
                assert torch.equal(k[:, :, begin:], expected[layer_idx][0])
                assert torch.equal(v[:, :, begin:], expected[layer_idx][1])
                if begin:
                    assert float((k[:, :, :begin] - ref[layer_idx][0][:, :, :begin]).abs().max()) < 1e-5


def test_disk_corruption_is_detected_while_streaming(tiny, tmp_path):
    """A flipped byte in a state file's body is a StoreError, not wrong KV."""
    adapter, ids, ref = tiny
    state = build_state(adapter.fingerprint(), ids[0], ref, [0] * 4, None)
    store = DiskStore(tmp_path)
    store.put("c", state)
    path = store.path("c")
    blob = bytearray(path.read_bytes())
    blob[-100] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(StoreError, match="checksum"):
        restore_into(adapter, DiskSource(path), BufferCache.for_adapter(adapter, N))


def test_restore_checks_model_and_capacity(tiny):
    """A state of another model, or a cache too small, is refused with a message."""
    adapter, ids, ref = tiny
    state = build_state(adapter.fingerprint(), ids[0], ref, [0] * 4, None)
    with pytest.raises(ValueError, match="capacity"):
        restore_into(adapter, state, BufferCache.for_adapter(adapter, N - 1))
    other = build_state(dict(adapter.fingerprint(), model="other"), ids[0], ref, [0] * 4, None)
    with pytest.raises(StoreError, match="another model"):
        restore_into(adapter, other, BufferCache.for_adapter(adapter, N))


def test_timeline_has_every_layer_of_both_streams(tiny):
    """timeline=True records (stream, layer, start_ms, end_ms) for each recomputed and loaded layer."""
    adapter, ids, ref = tiny
    lengths = LENGTHS["pyramid"]
    state = build_state(adapter.fingerprint(), ids[0], ref, lengths, None)
    report = restore_into(adapter, state, BufferCache.for_adapter(adapter, N), timeline=True)
    rec = {e[1] for e in report.events if e[0] == "recompute"}
    load = {e[1] for e in report.events if e[0] == "load"}
    assert rec == {l for l, n in enumerate(lengths) if n > 0}
    assert load == {l for l, n in enumerate(lengths) if n < N}
    assert all(isinstance(e[0], str) and 0 <= e[2] <= e[3] for e in report.events)
    assert report.recompute_s > 0 and report.load_s > 0


@torch.inference_mode()
def _stored_prefix(kind: str, seed: int, lengths):
    """A 3-layer model, 30 random tokens, their plain-forward logits (1, 30, vocab), and the state
    of the first 20 tokens' exact KV with recompute lengths `lengths`."""
    adapter = _adapter(kind, layers=3, seed=seed)
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(seed + 1))
    full = adapter.model(input_ids=ids).logits
    cache = DynamicCache()
    adapter.model(input_ids=ids[:, :20], past_key_values=cache, use_cache=True)
    state = build_state(adapter.fingerprint(), ids[0, :20], adapter.kv_from_cache(cache), lengths, None)
    return adapter, ids, full, state


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_model_continues_from_buffer_cache(kind):
    """Prefill of new tokens and decode over a restored BufferCache match one plain forward (1e-5)."""
    adapter, ids, full, state = _stored_prefix(kind, seed=2, lengths=[12, 8, 2])
    with torch.inference_mode():
        buf = BufferCache.for_adapter(adapter, 30)
        restore_into(adapter, state, buf)
        logits = adapter.forward(ids[:, 20:28], buf)
        assert buf.get_seq_length() == 28
        step = adapter.forward(ids[:, 28:29], buf)
        step2 = adapter.forward(ids[:, 29:30], buf)
    assert float((logits - full[:, 20:28]).abs().max()) < 1e-4
    assert float((step[:, -1] - full[:, 28]).abs().max()) < 1e-4
    assert float((step2[:, -1] - full[:, 29]).abs().max()) < 1e-4
    with pytest.raises(ValueError, match="holds 30 tokens"):
        adapter.forward(ids[:, :1], buf)


def test_buffer_cache_views_and_crop():
    """BufferCache layers expose prefix views; assigning a prefix view (adapter.crop) sets the length."""
    adapter = _adapter(layers=2)
    buf = BufferCache.for_adapter(adapter, 10)
    k = torch.randn(1, 2, 6, 16)
    out_k, _ = buf.update(k, k + 1, 0)
    assert torch.equal(out_k, k) and buf.layers[0].length == 6
    ModelAdapter.crop(buf, 4)
    assert buf.layers[0].length == 4 and torch.equal(buf.layers[0].keys, k[:, :, :4])
    buf.update(k[:, :, :2], k[:, :, :2], 0)
    assert torch.equal(buf.layers[0].keys[:, :, 4:6], k[:, :, :2])
    assert buf.get_mask_sizes(3, 0)[0] == 9


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_growing_buffer_cache_continues_past_its_capacity(kind):
    """With grow=True a restored cache too small for the new input and decode reallocates, keeps
    every held token, and the logits still match one plain forward; restore_cache sizes it."""
    adapter, ids, full, state = _stored_prefix(kind, seed=4, lengths=[9, 4, 0])
    with torch.inference_mode():
        buf, report = restore_cache(adapter, state, extra_tokens=2, grow=True)
        assert buf.capacity == 22 and buf.get_seq_length() == 20 and report.restore_s > 0
        logits = adapter.forward(ids[:, 20:27], buf)  # passes 22: reallocates
        assert buf.capacity >= 27 and buf.get_seq_length() == 27
        steps = [adapter.forward(ids[:, i:i + 1], buf)[:, -1] for i in range(27, 30)]
        ModelAdapter.crop(buf, 25)
        again = adapter.forward(ids[:, 25:30], buf)
    assert float((logits - full[:, 20:27]).abs().max()) < 1e-4
    for i, step in zip(range(27, 30), steps):
        assert float((step - full[:, i]).abs().max()) < 1e-4
    assert float((again - full[:, 25:30]).abs().max()) < 1e-4
    with pytest.raises(ValueError, match="extra_tokens"):
        restore_cache(adapter, state, extra_tokens=-1)


def test_recompute_into_rejects_growing_lengths(tiny):
    """Recompute lengths must be non-increasing with depth (the pyramid's precondition)."""
    adapter, ids, _ = tiny
    with pytest.raises(ValueError, match="non-increasing"):
        recompute_into(adapter, ids, [5, 6, 0, 0], BufferCache.for_adapter(adapter, N))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_layerwise_prefill_equals_the_model_forward(kind):
    """The new input run one decoder layer at a time over a restored BufferCache gives the plain
    forward's last logits and the same K/V in the cache (the steps a CUDA graph per layer replays)."""
    from krul.adapter import LayerwisePrefill

    adapter, ids, full, state = _stored_prefix(kind, 3, [0, 0, 0])
    cache, _ = restore_cache(adapter, state, extra_tokens=10)
    prefill = LayerwisePrefill(adapter, cache, 20, ids[:, 20:])
    logits, tok = prefill.run()
    assert torch.allclose(logits[0, -1], full[0, -1], atol=1e-4)
    assert int(tok) == int(full[0, -1].argmax()) and cache.get_seq_length() == 30
    ref = DynamicCache()
    with torch.inference_mode():
        adapter.model(input_ids=ids, past_key_values=ref, use_cache=True)
    for (k, v), (rk, rv) in zip(cache.kv(), adapter.kv_from_cache(ref)):
        assert torch.allclose(k, rk, atol=1e-5) and torch.allclose(v, rv, atol=1e-5)
    with pytest.raises(ValueError, match="CUDA"):
        LayerwisePrefill(adapter, cache, 20, ids[:, 20:], graphs=True)


def _packed_and_plain(tiny, method, lengths):
    from krul.store import MemoryStore

    adapter, ids, ref = tiny
    kwargs = {"svd": {"rank_ratio": 0.5, "retain_ratio": 0.1}, "merge": {"retain_ratio": 0.1}, "share": {}}[method]
    state = build_state(adapter.fingerprint(), ids[0], ref, lengths, None, pairs=[(1, 3)], method=method,
                        compress_kwargs=kwargs)
    store = MemoryStore(pack=True)
    store.put("c", state)
    return state, store.get("c")


@pytest.mark.parametrize("method", ["share", "merge", "svd"])
@pytest.mark.parametrize("lengths", [[0, 0, 0, 0], [20, 10, 5, 0]])
def test_packed_state_restores_bit_identically_to_the_unpacked_one(tiny, method, lengths):
    """restore_into from a packed state (pairs + exact layers, full load or pyramid) fills the buffers
    bit for bit as the unpacked state does."""
    adapter, _, _ = tiny
    state, packed = _packed_and_plain(tiny, method, lengths)
    caches = []
    for source in (state, packed):
        cache = BufferCache.for_adapter(adapter, N).fill_(float("nan"))
        report = restore_into(adapter, source, cache)
        assert report.loaded_bytes == state.kv_bytes() - sum(
            it.payload.nbytes() for it in state.items if all(it.end <= lengths[l] for l in it.layers))
        caches.append(cache.kv())
    for (k, v), (pk, pv) in zip(*caches):
        assert torch.equal(k, pk) and torch.equal(v, pv)


def test_make_jobs_finds_the_packed_blob_only_where_it_is():
    """_make_jobs gives each packed item's job the one blob its tensors lie in (at the job's own
    offsets, bytes equal); unpacked and cropped packed items keep the per-tensor path."""
    from krul.restore import _make_jobs
    from krul.store import MemoryStore, StoredItem, StoredState

    g = torch.Generator().manual_seed(3)
    kv = [(torch.randn(1, 2, 12, 8, generator=g), torch.randn(1, 2, 12, 8, generator=g)) for _ in range(4)]
    state = build_state({"model": "toy"}, torch.arange(12), kv, [6, 4, 2, 0], None, pairs=[(1, 3)],
                        method="svd", compress_kwargs={"rank_ratio": 0.5, "retain_ratio": 0.2})
    store = MemoryStore(pack=True)
    store.put("c", state)
    packed = store.get("c")
    jobs = _make_jobs(packed)
    assert len(jobs) == len(state.items) and {j.method for j in jobs} == {"exact", "svd"}
    for job in jobs:
        assert job.blob is not None and job.blob.dtype == torch.uint8 and job.blob.numel() == job.total
        base = job.blob.data_ptr()
        for src, off, nb in zip(job.sources, job.offsets, job.nbytes):
            assert src.data_ptr() - base == off
            assert torch.equal(job.blob[off:off + nb], src.reshape(-1).view(torch.uint8))
    assert all(job.blob is None for job in _make_jobs(state))
    cropped = [StoredItem(it.layers, it.start, it.end, it.payload) if it.layers != (0,)
               else it.crop_left(8) for it in packed.items]
    crop_state = StoredState(packed.fingerprint, packed.token_ids, (8, 4, 2, 0), cropped)
    by_layers = {j.item.layers: j for j in _make_jobs(crop_state)}
    assert by_layers[(0,)].blob is None and by_layers[(1, 3)].blob is not None


def test_cuda_batches_issue_every_copy_before_any_placement():
    """The CUDA direct path issues a batch's copies (in job order) before its placements, and each
    placement gets its own job's copied event."""
    from krul.restore import _copies_then_placements

    order = []

    def copy(job):
        order.append(("copy", job))
        return f"ev{job}"

    def place(job, ev):
        order.append(("place", job, ev))

    _copies_then_placements([0, 1, 2], copy, place)
    assert order == [("copy", 0), ("copy", 1), ("copy", 2),
                     ("place", 0, "ev0"), ("place", 1, "ev1"), ("place", 2, "ev2")]
    order.clear()
    _copies_then_placements([], copy, place)
    assert order == []


def test_loads_are_placed_on_the_loaders_own_thread(tiny, monkeypatch):
    """While layers are recomputed, every load is issued and placed by the loader's issue thread,
    never by the thread that runs the recompute, and the restore stays exact."""
    import threading

    import krul.restore as restore_mod

    adapter, ids, ref = tiny
    state = build_state(adapter.fingerprint(), ids[0], ref, LENGTHS["pyramid"], None)
    placed_by = []
    real_place = restore_mod._place

    def spy(job, *args, **kwargs):
        placed_by.append(threading.current_thread().name)
        return real_place(job, *args, **kwargs)

    monkeypatch.setattr(restore_mod, "_place", spy)
    for issue in restore_mod.ISSUE_MODES:
        placed_by.clear()
        cache = BufferCache.for_adapter(adapter, N)
        report = restore_into(adapter, state, cache, issue=issue, lookahead=1)
        assert report.mode == "cpu-thread/direct"
        assert placed_by and set(placed_by) == {"krul-issue_all"}
        assert _max_err(cache.kv(), ref) < 1e-5
    with pytest.raises(ValueError, match="issue must be one of"):
        restore_into(adapter, state, BufferCache.for_adapter(adapter, N), issue="main")


def test_the_issue_thread_enqueues_every_job_in_batches():
    """`_Loader.issue_all` (the body of the CUDA issue thread) issues `batch` jobs at a time until
    none is pending, and stops at an abort."""
    from types import SimpleNamespace

    from krul.restore import _Abort, _Loader

    def fake(n_jobs, abort_after=None):
        calls = []
        loader = SimpleNamespace(pending=n_jobs, abort=False)

        def issue_direct(k):
            calls.append(min(k, loader.pending))
            loader.pending -= calls[-1]
            loader.abort = abort_after is not None and len(calls) >= abort_after

        loader.issue_direct = issue_direct
        return loader, calls

    loader, calls = fake(7)
    _Loader.issue_all(loader, 3)
    assert calls == [3, 3, 1] and loader.pending == 0
    loader, calls = fake(7)
    _Loader.issue_all(loader, 0)
    assert calls == [1] * 7
    loader, calls = fake(7, abort_after=1)
    with pytest.raises(_Abort):
        _Loader.issue_all(loader, 2)
    assert calls == [2]
