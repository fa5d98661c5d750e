"""CUDA restore paths: streams, pinned/pageable/disk loaders, CUDA-graph prefill (skipped without CUDA)."""
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

if torch.cuda.is_available():  # imports only where they can run
    from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

    from krul import bench, profile
    from krul.adapter import ModelAdapter
    from krul.restore import BufferCache, DiskSource, HostPool, load_layers, restore, restore_into
    from krul.store import DiskStore, MemoryStore, build_state

N = 300


def _adapter(layers=4, hidden=256, heads=8, kv_heads=4, seed=0):
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=512,
                      max_position_embeddings=8192, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    return ModelAdapter(model.eval(), name=f"gpu-tiny-{layers}")


@pytest.fixture(scope="module")
def tiny():
    adapter = _adapter()
    ids = torch.randint(0, 512, (1, N), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.inference_mode():
        cache = DynamicCache()
        adapter.model(input_ids=ids, past_key_values=cache, use_cache=True)
    ref = [(k.clone(), v.clone()) for k, v in adapter.kv_from_cache(cache)]
    return adapter, ids, ref


def _stored(adapter, ids, ref, lengths, tier, tmp_path, pairs=(), method="merge"):
    state = build_state(adapter.fingerprint(), ids[0].cpu(), ref, lengths, None, pairs=pairs, method=method,
                        compress_kwargs={"retain_ratio": 0.05} if pairs and method == "merge" else {})
    if tier == "disk":
        store = DiskStore(tmp_path)
        store.put("c", state)
        return state, DiskSource(store.path("c"))
    store = MemoryStore(pinned=tier == "pinned")
    store.put("c", state)
    return state, store.get("c")


@pytest.mark.parametrize("tier,mode", [("pinned", "direct"), ("pageable", "pool"), ("disk", "pool")])
@pytest.mark.parametrize("lengths", [[0, 0, 0, 0], [200, 150, 60, 0], [N] * 4])
def test_cuda_restore_from_each_tier(tiny, tmp_path, tier, mode, lengths):
    """Loaded tokens arrive bit for bit, recomputed ones match the forward (bf16), on the right path."""
    adapter, ids, ref = tiny
    state, source = _stored(adapter, ids, ref, lengths, tier, tmp_path)
    cache = BufferCache.for_adapter(adapter, N + 16).fill_(float("nan"))
    torch.cuda.synchronize()
    report = restore_into(adapter, source, cache, timeline=True)
    nothing_loaded = all(l == N for l in lengths)
    assert report.mode == f"cuda-streams/{'none' if nothing_loaded else mode}"
    for layer_idx, ((k, v), (rk, rv)) in enumerate(zip(cache.kv(), ref)):
        begin = lengths[layer_idx]
        assert torch.equal(k[:, :, begin:], rk[:, :, begin:]) and torch.equal(v[:, :, begin:], rv[:, :, begin:])
        if begin:
            assert float((k[:, :, :begin] - rk[:, :, :begin]).abs().max()) < 0.05
    if any(l < N for l in lengths):
        assert {"h2d", "place"} <= {e[0] for e in report.events} and report.load_s > 0
    if lengths[0]:
        assert "recompute" in {e[0] for e in report.events} and report.recompute_s > 0


def test_cuda_pool_with_many_small_chunks_and_pairs(tiny, tmp_path):
    """Compressed pairs streamed from disk through 2 x 64 KiB pinned slots expand like `load_layers`."""
    adapter, ids, ref = tiny
    state, source = _stored(adapter, ids, ref, [120, 60, 30, 0], "disk", tmp_path, pairs=((1, 3),))
    expected = load_layers(state, torch.device("cuda"))
    cache = BufferCache.for_adapter(adapter, N).fill_(float("nan"))
    restore_into(adapter, source, cache, pool=HostPool(2, 64 << 10, pin=True), n_readers=2)
    for layer_idx, (k, v) in enumerate(cache.kv()):
        begin = state.recompute_lengths[layer_idx]
        assert torch.equal(k[:, :, begin:], expected[layer_idx][0])
        assert torch.equal(v[:, :, begin:], expected[layer_idx][1])


def test_engine_restore_is_lossless_on_cuda(tiny):
    """restore() (the engine's entry point) gives bit-identical KV for a full load from pinned memory."""
    adapter, ids, ref = tiny
    state = build_state(adapter.fingerprint(), ids[0].cpu(), ref, [0] * 4, None)
    store = MemoryStore(pinned=True)
    store.put("c", state)
    layers, report = restore(adapter, store.get("c"))
    assert all(torch.equal(k, rk) and torch.equal(v, rv) for (k, v), (rk, rv) in zip(layers, ref))
    assert report.mode == "cuda-streams/direct"


def test_streams_overlap_on_a_larger_model(tmp_path):
    """With a pyramid split, host-to-device copies run while layers are recomputed."""
    adapter = _adapter(layers=8, hidden=1024, heads=16, kv_heads=16, seed=3)
    n = 4096
    ids = torch.randint(0, 512, (1, n), generator=torch.Generator().manual_seed(2)).cuda()
    cache = BufferCache.for_adapter(adapter, n)
    with torch.inference_mode():
        from krul.restore import recompute_into

        recompute_into(adapter, ids, [n] * 8, cache)
        ref = [(k.clone(), v.clone()) for k, v in cache.kv()]
    lengths = [2048, 1792, 1536, 1280, 1024, 768, 512, 256]
    state, source = _stored(adapter, ids, ref, lengths, "pinned", tmp_path)
    restore_into(adapter, source, cache)  # warm-up
    report = restore_into(adapter, source, cache, timeline=True)
    rec = [e for e in report.events if e[0] == "recompute"]
    h2d = [e for e in report.events if e[0] == "h2d"]
    rec_span = (min(e[2] for e in rec), max(e[3] for e in rec))
    assert any(e[2] < rec_span[1] and e[3] > rec_span[0] for e in h2d), (rec_span, h2d[:3])


def test_graph_prefill_matches_eager(tiny):
    """The CUDA-graph new-input prefill gives the eager path's first token over the same buffers."""
    adapter, ids, ref = tiny
    cache = BufferCache.for_adapter(adapter, N + 32)
    for (k, v), layer in zip(ref, cache.layers):
        layer._k_buf[:, :, :N].copy_(k)
        layer._v_buf[:, :, :N].copy_(v)
    new = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(5))
    graph = bench.NewInputPrefill(adapter, cache, N, new, "graph")
    assert graph.mode == "graph", graph.mode
    eager = bench.NewInputPrefill(adapter, cache, N, new, "eager")
    assert graph.run() == eager.run() == graph.run()
    assert cache.get_seq_length() == N + 32


@pytest.mark.parametrize("tier", ["pinned", "disk"])
def test_layer_join_gives_the_same_prefill(tiny, tmp_path, tier):
    """join="layer" (per-layer waits in the forward) gives the same logits as a full join."""
    adapter, ids, ref = tiny
    state, source = _stored(adapter, ids, ref, [200, 150, 60, 0], tier, tmp_path)
    new = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(7)).cuda()
    out = {}
    for join in ("end", "layer"):
        cache = BufferCache.for_adapter(adapter, N + 16).fill_(float("nan"))
        torch.cuda.synchronize()
        report = restore_into(adapter, source, cache, join=join, timeline=True)
        with torch.inference_mode():
            out[join] = adapter.forward(new, cache)
        torch.cuda.synchronize()
        report.finalize()
        assert report.restore_s > 0 and report.events
        assert all(not layer.pending for layer in cache.layers)
    assert torch.isfinite(out["layer"]).all()
    assert float((out["end"] - out["layer"]).abs().max()) < 1e-2


def test_measured_rates_on_cuda():
    """Pinned and pageable bandwidths and the recompute rate are measured and positive."""
    adapter = _adapter()
    profile.clear_cache()
    pinned = profile.measure_rates(adapter, "pinned", (64, 256), repeats=2, load_bytes=64 << 20)
    pageable = profile.measure_rates(adapter, "pageable", (64, 256), repeats=2, load_bytes=64 << 20)
    assert pinned.load_bytes_per_s > 1e9 and pageable.load_bytes_per_s > 1e8
    assert pinned.recompute_s_per_token + pinned.recompute_s_per_layer + pinned.recompute_s_fixed > 0
    assert profile.raw_bandwidth("pinned", "cuda") > profile.raw_bandwidth("pageable", "cuda") * 0.5


def test_bench_tiny_on_cuda(tmp_path):
    """The benchmark runs every policy and tier on CUDA with the graph prefill and all columns."""
    rows = bench.run_ttft(dict(shapes=["tiny-llama"], lengths=[256], tiers=["pinned", "pageable", "disk"],
                               new_tokens=16, repeats=2, warmup=1, device="cuda", rates_grid=[64, 256],
                               load_profile_bytes=16 << 20, bandwidth_bytes=64 << 20,
                               prefill=["graph", "eager", "eager-overlap", "layer-graphs"],
                               out=str(tmp_path / "t.csv"), log=lambda m: None))
    assert len(rows) == 3 * 4 * len(bench.DEFAULT_POLICIES)
    assert all(set(bench.COLUMNS) <= set(r) for r in rows)
    assert {r["prefill_mode"] for r in rows} == {"graph", "eager", "eager-overlap", "layer-graphs"}
    assert all(r["restore_mode"].startswith("cuda-streams") for r in rows)
    # the four new-input paths compute the same thing over the same restored (lossless) history
    for tier in ("pinned", "pageable", "disk"):
        tokens = {r["first_token"] for r in rows if r["tier"] == tier and r["policy"] == "full-load"}
        assert len(tokens) == 1, (tier, tokens)



@pytest.mark.parametrize("method", ["svd", "merge"])
def test_pinned_packed_pairs_copy_once_per_item(tiny, tmp_path, method):
    """The pinned tier packs each item into one page-locked blob that the direct path copies whole;
    a pyramid of pairs and exact layers restores bit for bit as from the unpacked pinned tensors."""
    from krul.restore import _make_jobs

    adapter, ids, ref = tiny
    state, packed = _stored(adapter, ids, ref, [120, 60, 30, 0], "pinned", tmp_path, pairs=((1, 3),),
                            method=method)
    plain_store = MemoryStore(pinned=True, pack=False)
    plain_store.put("c", state)
    plain = plain_store.get("c")
    jobs = _make_jobs(packed)
    assert jobs and all(j.blob is not None and j.blob.is_pinned() for j in jobs)
    assert all(j.blob is None for j in _make_jobs(plain))
    caches = []
    for source in (plain, packed):
        cache = BufferCache.for_adapter(adapter, N).fill_(float("nan"))
        torch.cuda.synchronize()
        report = restore_into(adapter, source, cache, timeline=True)
        assert report.mode == "cuda-streams/direct"
        assert {e[1] for e in report.events if e[0] == "h2d"} == {0, 1, 2, 3}
        caches.append(cache.kv())
    for begin, (k, v), (pk, pv) in zip(state.recompute_lengths, *caches):
        assert torch.equal(k[:, :, begin:], pk[:, :, begin:]) and torch.equal(v[:, :, begin:], pv[:, :, begin:])


@pytest.mark.parametrize("join", ["end", "layer"])
def test_pinned_loads_issued_from_their_own_thread(tiny, tmp_path, monkeypatch, join):
    """issue="thread": the pinned loads are enqueued by the loader's issue thread while the calling
    thread recomputes; the buffers are the same as with interleaved issue."""
    import threading

    import krul.restore as restore_mod

    adapter, ids, ref = tiny
    lengths = [200, 150, 60, 0]
    _, source = _stored(adapter, ids, ref, lengths, "pinned", tmp_path)
    issued_by = []
    real_copy = restore_mod._Loader._copy_direct

    def spy(self, job):
        issued_by.append(threading.current_thread().name)
        return real_copy(self, job)

    monkeypatch.setattr(restore_mod._Loader, "_copy_direct", spy)
    out = {}
    for issue in ("interleaved", "thread"):
        issued_by.clear()
        cache = BufferCache.for_adapter(adapter, N + 16)
        torch.cuda.synchronize()
        report = restore_into(adapter, source, cache, issue=issue, join=join)
        torch.cuda.synchronize()
        if join == "layer":
            report.finalize()
        out[issue] = [t.clone() for kv in cache.kv() for t in kv]
        main = threading.main_thread().name
        if issue == "thread":
            assert report.mode == "cuda-streams/direct-thread"
            assert issued_by and set(issued_by) == {"krul-issue_all"}
        else:
            assert report.mode == "cuda-streams/direct" and set(issued_by) == {main}
    flat_ref = [t for kv in ref for t in kv]
    for issue, tensors in out.items():
        for i, (t, r) in enumerate(zip(tensors, flat_ref)):
            begin = lengths[i // 2]
            assert torch.equal(t[:, :, begin:N], r[:, :, begin:]), issue  # loaded: bit for bit
            if begin:
                assert float((t[:, :, :begin] - r[:, :, :begin]).abs().max()) < 0.05, issue
