"""Storage codec (krul.quant): error bounds, packing, bytes, dtype contracts, disk and restore round trips."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from krul import quant
from krul.compression import compress_pair
from krul.pricing import (PlanPricing, full_storage_bytes, pair_nbytes, pair_shapes, quantized_payload_nbytes,
                          state_storage_bytes, storage_nbytes, storage_ratio)
from krul.quant import QuantizedPayload, dequantize, pack, quantize, quantize_payload, unpack
from krul.store import (CorruptStateError, DiskStore, ExactLayer, build_state, deserialize, payload_from_tensors,
                        serialize)

H, D = 2, 16
PAIR_KW = {"share": {}, "merge": {"retain_ratio": 0.1, "sink_tokens": 1},
           "svd": {"rank_ratio": 0.5, "retain_ratio": 0.1, "sink_tokens": 1}}


def _kv(n, seed, dtype=torch.float32, shape=None):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*(shape or (1, H, n, D)), generator=g).to(dtype) for _ in range(2))


def _payload(method, n=45, dtype=torch.float32):
    if method == "exact":
        return ExactLayer(*_kv(n, 1, dtype))
    a, b = _kv(n, 1, dtype), _kv(n, 2, dtype)
    b = tuple(x + 0.3 * y for x, y in zip(a, b))
    return compress_pair(method, a, b, 1, 2, **PAIR_KW[method])


def _reference(q: QuantizedPayload):
    """The dequantized inner payload (what a quantized payload must place)."""
    return payload_from_tensors(q.inner, q.dequantize_tensors(), q.inner_meta)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_round_trip_error_within_half_a_step(bits, group, axis):
    """Every element dequantizes within scale/2 of its group's scale (plus fp32 rounding), for every axis."""
    x = torch.randn(3, 70, 5, generator=torch.Generator().manual_seed(bits + group)) * 3 + 1
    x[0, 0, 0] = 40.0  # an outlier only widens its own group
    codes, scale, zero = quantize(x, axis, bits, group)
    y = dequantize(codes, scale, zero, x.shape, axis, bits)
    assert y.shape == x.shape and y.dtype == x.dtype
    n = x.shape[axis]
    g = quant.effective_group(n, bits, group)  # a shorter axis is one group of its own length
    assert g == min(group, -(-n // (8 // bits)) * (8 // bits))
    half = (scale / 2).repeat_interleave(g, dim=-1)[..., :n].movedim(-1, axis)
    assert ((x - y).abs() <= half * (1 + 1e-5) + 1e-6).all()
    assert codes.dtype == torch.uint8 and codes.shape[-1] == g * bits // 8


@pytest.mark.parametrize("bits", [4, 2])
def test_bit_packing_is_exact(bits):
    """pack/unpack are inverse on every code value, and pack puts 8 / bits codes in a byte."""
    q = torch.randint(0, 1 << bits, (7, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = pack(q, bits)
    assert packed.shape == (7, 64 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack(packed, bits), q)
    every = torch.arange(1 << bits, dtype=torch.uint8).repeat(8)[None, :64 if bits == 2 else 32]
    assert torch.equal(unpack(pack(every, bits), bits), every)


def test_constant_groups_and_empty_tensors():
    """A constant group dequantizes exactly; a zero-length tensor quantizes to zero groups."""
    x = torch.full((2, 40), 3.25)
    assert torch.equal(dequantize(*quantize(x, 1, 4, 32), x.shape, 1, 4), x)
    e = torch.zeros(2, 0)
    c, s, z = quantize(e, 1, 2, 32)
    assert c.shape == (2, 0, 1) and dequantize(c, s, z, e.shape, 1, 2).shape == (2, 0)


def test_bad_codecs_are_refused():
    """Unsupported bit widths and groups that do not fill whole bytes raise CodecError."""
    for bits, group in ((3, 32), (4, 0), (2, 30), (4, 33)):
        with pytest.raises(quant.CodecError):
            quant.check_codec(bits, group)


@pytest.mark.parametrize("method", ["exact", "share", "merge", "svd"])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_payload_bytes_equal_stored_and_priced(method, bits):
    """nbytes() is the stored tensors' bytes, equals the pricing of its shapes, and storage_nbytes
    counts it at 2 bytes per scale; integer tensors (retain_idx) are kept as they are."""
    p = _payload(method)
    q = quantize_payload(p, bits, 32)
    assert q.nbytes() == sum(t.numel() * t.element_size() for t in q.tensors().values())
    shapes = ({"keys": tuple(p.keys.shape), "values": tuple(p.values.shape)} if method == "exact"
              else pair_shapes(method, 45, H, D, **PAIR_KW[method]))
    if method != "exact":
        assert sum(math.prod(s) * (4 if n != "retain_idx" else 4) for n, s in shapes.items()) == \
            pair_nbytes(method, 45, H, D, 4, **PAIR_KW[method])
        assert all(tuple(p.data[n].shape) == s for n, s in shapes.items())
    assert quantized_payload_nbytes(method, shapes, bits, 32, 4) == q.nbytes()
    assert storage_nbytes(q) == quantized_payload_nbytes(method, shapes, bits, 32, 2)
    assert storage_nbytes(quantize_payload(_payload(method, dtype=torch.bfloat16), bits, 32)) == storage_nbytes(q)
    if method in ("merge", "svd"):
        assert torch.equal(q.data["retain_idx"], p.data["retain_idx"])


@pytest.mark.parametrize("method", ["exact", "share", "merge", "svd"])
@pytest.mark.parametrize("start", [0, 1, 5, 32, 33, 45])
def test_crop_left_keeps_the_codes(method, start):
    """crop_left of a quantized payload = the dequantized payload cropped, bit for bit (no re-quantization)."""
    q = quantize_payload(_payload(method), 4, 32)
    c = q.crop_left(start)
    assert c.n_tokens() == 45 - start
    got, want = c.expand(), _reference(q).crop_left(start).expand()
    for (k, v), (rk, rv) in zip(got, want):
        assert torch.equal(k, rk) and torch.equal(v, rv)
    twice = q.crop_left(3).crop_left(start - 3) if start >= 3 else None
    if twice is not None:
        assert all(torch.equal(a, b) for la, lb in zip(twice.expand(), want) for a, b in zip(la, lb))


@pytest.mark.parametrize("method", ["exact", "share", "merge", "svd"])
def test_place_equals_dequantized_reference(method):
    """place() writes each layer's tokens [skip:] as the dequantized payload's expansion, and nothing else."""
    q = quantize_payload(_payload(method), 2, 32)
    want = _reference(q).expand()
    n = q.n_tokens()
    for skips in ((0, 0), (7, 33), (45, 3), (40, 45))[: 2 if method == "exact" else 4]:
        skips = skips[: len(want)]
        bufs = [[torch.full((1, H, n + 2, D), float("nan")) for _ in range(2)] for _ in want]
        outs = [None if s == n else (b[0][:, :, 1 + s:1 + n], b[1][:, :, 1 + s:1 + n]) for b, s in zip(bufs, skips)]
        q.place(outs, skips)
        for (bk, bv), (rk, rv), s in zip(bufs, want, skips):
            assert torch.equal(bk[:, :, 1 + s:1 + n], rk[:, :, s:]) and torch.equal(bv[:, :, 1 + s:1 + n], rv[:, :, s:])
            assert bk[:, :, :1 + s].isnan().all() and bk[:, :, 1 + n:].isnan().all()


class _Results(TorchDispatchMode):
    """Records every aten op's name and result tensors."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        outs = [r for r in (result if isinstance(result, (list, tuple)) else [result]) if isinstance(r, torch.Tensor)]
        self.ops.append((func.overloadpacket.__name__, outs))
        return result


@pytest.mark.parametrize("method", ["exact", "merge", "svd"])
def test_bf16_dequantization_makes_no_large_fp32_tensor(method):
    """A bf16 quantized payload places in bf16: no op makes an fp32 tensor over 1 MiB."""
    shape = (1, 4, 1024, 64)  # one K in fp32: 1 MiB
    if method == "exact":
        p = ExactLayer(*_kv(0, 3, torch.bfloat16, shape))
    else:
        p = compress_pair(method, _kv(0, 3, torch.bfloat16, shape), _kv(0, 4, torch.bfloat16, shape), 0, 1,
                          **({"ranks": (40, 40), "retain_ratio": 0.02} if method == "svd" else {"retain_ratio": 0.02}))
    q = quantize_payload(p, 4, 64)
    bufs = [tuple(torch.empty(shape, dtype=torch.bfloat16) for _ in range(2)) for _ in range(1 if method == "exact" else 2)]
    with _Results() as rec:
        q.place(bufs, [0] * len(bufs))
    big = [(name, tuple(r.shape)) for name, outs in rec.ops for r in outs
           if r.dtype == torch.float32 and r.numel() * 4 >= 1 << 20]
    assert not big
    want = _reference(q).expand()
    assert all(torch.equal(b, w) for bl, wl in zip(bufs, want) for b, w in zip(bl, wl))


def _tiny_state(method="svd", lengths=(10, 5, 3, 0), n=40):
    kv = [_kv(n, 10 + i) for i in range(4)]
    kw = PAIR_KW.get(method, {})
    return build_state({"kv_heads": H, "head_dim": D}, torch.arange(n), kv, list(lengths), None,
                       pairs=[(0, 1)] if method != "exact" else [], method=method if method != "exact" else "merge",
                       compress_kwargs=kw)


@pytest.mark.parametrize("bits", [8, 2])
def test_disk_round_trip(tmp_path, bits):
    """A quantized state serialises and reads back (deserialize and DiskStore) tensor for tensor."""
    state = _tiny_state().map_payloads(quant.codec_fn({"bits": bits, "group": 32}))
    back = deserialize(serialize(state))
    store = DiskStore(tmp_path)
    store.put("c", state)
    for got in (back, store.get("c")):
        assert got.kv_bytes() == state.kv_bytes()
        for a, b in zip(state.items, got.items):
            assert a.payload.meta() == b.payload.meta()
            assert all(torch.equal(a.payload.tensors()[k], t) for k, t in b.payload.tensors().items())


def test_disk_schema_refuses_inconsistent_quantized_items():
    """A header whose quantized item lies about its codes' shape is a CorruptStateError."""
    import hashlib
    import json

    from krul.store import MAGIC, PREFIX_NBYTES

    blob = serialize(_tiny_state().map_payloads(quant.codec_fn({"bits": 4, "group": 32})))
    n = int.from_bytes(blob[len(MAGIC):len(MAGIC) + 8], "little")
    header = json.loads(blob[PREFIX_NBYTES:PREFIX_NBYTES + n])
    for edit in ("bits", "lead", "inner"):
        h = json.loads(json.dumps(header))
        meta = h["items"][0]["meta"]
        if edit == "bits":
            meta["bits"] = 8
        elif edit == "lead":
            next(iter(meta["tensors"].values()))["lead"] = 40
        else:
            meta["inner"] = "share"
        raw = json.dumps(h).encode()
        head = MAGIC + len(raw).to_bytes(8, "little")
        with pytest.raises(CorruptStateError):
            deserialize(head + hashlib.sha256(head + raw).digest() + raw + blob[PREFIX_NBYTES + n:])


def test_plan_pricing_with_codec_equals_state_bytes():
    """PlanPricing with a codec prices the quantized single-turn state exactly (kv_bytes)."""
    n = 45
    for method in ("svd", "merge", "share"):
        for lengths in ((0, 0, 0, 0), (10, 5, 3, 0), (0, 20, 45, 2)):
            codec = {"bits": 4, "group": 32}
            state = _tiny_state(method, lengths, n).map_payloads(quant.codec_fn(codec))
            pricing = PlanPricing(n, 4, H, D, 4, ((0, 1),), method, PAIR_KW[method], codec)
            assert pricing.total_bytes(lengths) == state.kv_bytes(), (method, lengths)


def test_storage_ratio_is_independent_of_the_compute_dtype():
    """storage_ratio counts 2 bytes per unquantized element: the same in fp32 and bf16; full load = 1."""
    n = 40
    kv32 = [_kv(n, 10 + i) for i in range(4)]
    for codec, expected in ((None, 1.0), ({"bits": 8, "group": 32}, None), ({"bits": 2, "group": 32}, None)):
        ratios = []
        for dtype in (torch.float32, torch.bfloat16):
            kv = [tuple(t.to(dtype) for t in layer) for layer in kv32]
            state = build_state({"kv_heads": H, "head_dim": D}, torch.arange(n), kv, [0] * 4, None)
            if codec:
                state = state.map_payloads(quant.codec_fn(codec))
            ratios.append(storage_ratio(state))
            assert state_storage_bytes(state) * full_storage_bytes(n, 4, H, D) / state_storage_bytes(state) \
                == full_storage_bytes(n, 4, H, D)
        assert ratios[0] == ratios[1]
        if expected:
            assert ratios[0] == expected
    plain = _tiny_state()
    assert storage_ratio(plain.map_payloads(quant.codec_fn({"bits": 8, "group": 16}))) > 1.4 * storage_ratio(plain)


# -- restore on a tiny model ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

    from krul.adapter import ModelAdapter

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    adapter = ModelAdapter(AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval(), name="tiny-q")
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        cache = DynamicCache()
        adapter.model(input_ids=ids, past_key_values=cache, use_cache=True)
    yield adapter, ids, [(k.clone(), v.clone()) for k, v in adapter.kv_from_cache(cache)]
    torch.set_num_threads(threads)


@pytest.mark.parametrize("method", ["exact", "svd", "merge"])
def test_restore_of_a_quantized_state_equals_the_dequantized_reference(tiny, tmp_path, method):
    """restore_into (memory and disk) of a quantized state writes the dequantized payloads' KV at the
    loaded rows and the forward's KV at the recomputed ones."""
    from krul.restore import BufferCache, DiskSource, load_layers, restore_into

    adapter, ids, ref = tiny
    lengths = [20, 10, 5, 0]
    pairs = [(1, 3)] if method != "exact" else []
    state = build_state(adapter.fingerprint(), ids[0], ref, lengths, None, pairs=pairs,
                        method=method if method != "exact" else "merge", compress_kwargs=PAIR_KW.get(method))
    state = state.map_payloads(quant.codec_fn({"bits": 4, "group": 32}))
    deq = state.map_payloads(_reference)
    expected = load_layers(deq, torch.device("cpu"))
    assert all(torch.equal(a, b) for la, lb in zip(load_layers(state, torch.device("cpu")), expected)
               if la is not None for a, b in zip(la, lb))
    store = DiskStore(tmp_path)
    store.put("q", state)
    for source in (state, DiskSource(store.path("q"))):
        cache = BufferCache.for_adapter(adapter, 40).fill_(float("nan"))
        report = restore_into(adapter, source, cache)
        assert report.loaded_bytes == state.kv_bytes()
        for layer, (k, v) in enumerate(cache.kv()):
            begin = lengths[layer]
            assert torch.equal(k[:, :, begin:], expected[layer][0]) and torch.equal(v[:, :, begin:], expected[layer][1])
            if begin:
                assert float((k[:, :, :begin] - ref[layer][0][:, :, :begin]).abs().max()) < 1e-5


# -- policies ---------------------------------------------------------------------------------
NEW_POLICIES = {"int8": 8, "int4": 4, "kivi": 2, "krul-svd-loss-int8": 8, "krul-svd-loss-int4": 4}


def test_codec_policies_are_registered_and_the_others_have_no_codec():
    """The codec policies carry their bits and a paper; every other policy stores as before (no codec)."""
    from krul.policies import POLICIES

    for name, bits in NEW_POLICIES.items():
        p = POLICIES[name]
        assert p.compress_params["codec"]["bits"] == bits and "et al" in p.cite
    assert POLICIES["kivi"].compress_params["codec"]["group"] == 32 and "2402.02750" in POLICIES["kivi"].cite
    base = POLICIES["krul-svd-loss"]
    for name in ("krul-svd-loss-int8", "krul-svd-loss-int4"):
        assert POLICIES[name].with_params(name=base.name, cite=base.cite, compress_params=base.compress_params) == base
    assert not any("codec" in p.compress_params for n, p in POLICIES.items() if n not in NEW_POLICIES)


class _Engine:
    """What RestorePolicy.build reads of an engine (split 'load' / 'fixed': only the adapter)."""

    def __init__(self, adapter):
        self.adapter = adapter
        self.rates = None


@pytest.mark.parametrize("name", list(NEW_POLICIES))
def test_codec_policies_build_quantized_states_that_restore(tiny, name):
    """Each codec policy builds a state whose every payload is quantized at its bits, priced exactly by
    PlanPricing, restored like its dequantized reference; a second turn keeps the first turn's codes."""
    from krul.policies import POLICIES
    from krul.restore import BufferCache, load_layers, restore_into
    from krul.selector import CompressionPlan

    adapter, ids, ref = tiny
    policy, plan = POLICIES[name], None
    if policy.selector is not None:
        policy = policy.with_params(split="fixed", recompute_ratio=0.25)
        plan = CompressionPlan(((1, 3),), (), "svd", 4)
    if "window" in policy.compress_params["codec"]:  # the window has its own test below
        policy = policy.with_params(compress_params={"codec": {**policy.compress_params["codec"], "window": 0}})
    engine = _Engine(adapter)
    tokens = ids[0].tolist()
    first = policy.build(engine, tokens[:30], ref, None, plan)
    state = policy.build(engine, tokens, ref, first, plan)
    assert all(it.payload.method == "quant" and it.payload.bits == NEW_POLICIES[name] for it in state.items)
    kept = [it for it in state.items if it.end <= 30]
    assert kept
    for k in kept:  # the first turn's codes, cropped, never re-quantized
        f = next(f for f in first.items if f.layers == k.layers and f.end == k.end)
        want = f.payload.crop_left(k.start - f.start).tensors()
        assert all(torch.equal(t, want[n]) for n, t in k.payload.tensors().items())
    params = policy.compress_params
    single = policy.build(engine, tokens, ref, None, plan)
    pricing = PlanPricing.for_adapter(adapter, 40, plan, params)
    assert pricing.codec == params["codec"]
    assert pricing.total_bytes(single.recompute_lengths) == single.kv_bytes()
    expected = load_layers(state.map_payloads(_reference), torch.device("cpu"))
    cache = BufferCache.for_adapter(adapter, 40).fill_(float("nan"))
    restore_into(adapter, state, cache)
    for layer, (k, v) in enumerate(cache.kv()):
        begin = state.recompute_lengths[layer]
        assert torch.equal(k[:, :, begin:], expected[layer][0]) and torch.equal(v[:, :, begin:], expected[layer][1])
    assert storage_ratio(single) > {8: 1.5, 4: 2.5, 2: 3.5}[NEW_POLICIES[name]]


def test_quantized_svd_loss_policies_read_the_svd_loss_record(tmp_path, monkeypatch):
    """krul-svd-loss-int8/-int4 are calibrated by krul-svd-loss's dev record."""
    import json

    from krul import paths
    from krul.policies import get_policy

    (tmp_path / "calibration").mkdir()
    rec = {"split": "dev", "tau": 0.0, "target_ratio": 1.25, "n_pairs": 2, "layer_sensitivity": [0.5] * 6}
    (tmp_path / "calibration" / "m.svd-loss.json").write_text(json.dumps(rec))
    monkeypatch.setattr(paths, "experiments_dir", lambda: tmp_path)
    for name in ("krul-svd-loss-int8", "krul-svd-loss-int4"):
        p = get_policy(name, model="m")
        assert p.layer_weights == (0.5,) * 6 and p.selector_params["target_ratio"] == 1.25
        assert "codec" in p.compress_params


def test_kivi_window_keeps_the_newest_tokens_exact_until_the_next_offload(tiny):
    """kivi's residual window: the newest `window` tokens are stored exact; the next offload quantizes
    them (the one stored item compressed again) and keeps its own newest tokens exact; the restore
    gives the exact window and the dequantized rest."""
    from krul.policies import POLICIES
    from krul.restore import BufferCache, load_layers, restore_into

    adapter, ids, ref = tiny
    kivi = POLICIES["kivi"]
    assert kivi.compress_params["codec"]["window"] == 128  # KIVI's R
    policy = kivi.with_params(compress_params={"codec": {**kivi.compress_params["codec"], "window": 8}})
    engine = _Engine(adapter)
    tokens = ids[0].tolist()
    n = len(tokens)
    first = policy.build(engine, tokens[:30], ref, None, None)
    def split(state, cut):
        for it in state.items:
            assert it.end <= cut or it.start >= cut  # no item straddles the window's edge
        return ([it for it in state.items if it.end <= cut], [it for it in state.items if it.start >= cut])
    old, window = split(first, 22)
    assert old and window and all(it.payload.method == "quant" for it in old)
    assert all(it.payload.method == "exact" and (it.start, it.end) == (22, 30) for it in window)
    state = policy.build(engine, tokens, ref, first, None)
    old, window = split(state, n - 8)
    assert all(it.payload.method == "quant" for it in old)  # turn 1's window quantized now
    assert any(it.start <= 22 and it.end >= 30 or (it.start, it.end) == (22, 30) for it in old)
    assert all(it.payload.method == "exact" and it.end == n for it in window) and window
    assert sum(it.end - it.start for it in state.items) == n * adapter.n_layers  # every token-layer once
    expected = load_layers(state.map_payloads(lambda q: _reference(q) if q.method == "quant" else q),
                           torch.device("cpu"))
    cache = BufferCache.for_adapter(adapter, n).fill_(float("nan"))
    restore_into(adapter, state, cache)
    for layer, (k, v) in enumerate(cache.kv()):
        assert torch.equal(k, expected[layer][0]) and torch.equal(v, expected[layer][1])
        assert torch.equal(k[:, :, n - 8:], ref[layer][0][:, :, n - 8:n])  # the window is exact
    whole = policy.with_params(compress_params={"codec": {**policy.compress_params["codec"], "window": 0}})
    assert storage_ratio(whole.build(engine, tokens, ref, first, None)) > storage_ratio(state) > 1.0
