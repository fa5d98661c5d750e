"""Placement of compressed pairs straight into buffer views (compression.place_pair, restore._place).

Tensor-only and small: the equality tests use tiny segments; the contract tests record every aten op
of one bf16 placement on the CPU under a `TorchDispatchMode`.
"""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from krul.compression import CompressedPair, compress_pair, place_pair

B, H, T, D = 1, 4, 96, 16
START, TAIL = 3, 5  # buffer rows before and after the segment (they must stay untouched)
METHODS = {
    "share": {},
    "merge": {"retain_ratio": 0.1, "sink_tokens": 2},
    "svd": {"ranks": (13, 21), "retain_ratio": 0.1, "sink_tokens": 2},  # odd ranks: padded to 16, 24
    "svd-even": {"ranks": (16, 8), "retain_ratio": 0.05, "sink_tokens": 1},
    "svd-plain": {"ranks": (5, 3), "sink_tokens": 0},  # no exact tokens at all
}
# per layer (a, b): skips as fractions of the segment or named positions resolved in `_skip`
SKIPS = [(0, 0), ("mid", "mid"), ("last", "last"), (0, "third"), ("last", "sink"),
         ("retained", "after_retained"), ("all", "third"), (0, "all")]


def _pair(method, dtype, shape=(B, H, T, D), seed=0):
    g = torch.Generator().manual_seed(seed)
    k_a, v_a = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    k_b = k_a + 0.5 * torch.randn(*shape, generator=g)
    v_b = v_a + 0.5 * torch.randn(*shape, generator=g)
    kv_a, kv_b = (k_a.to(dtype), v_a.to(dtype)), (k_b.to(dtype), v_b.to(dtype))
    return compress_pair(method.split("-")[0], kv_a, kv_b, 4, 7, **METHODS[method])


def _skip(p: CompressedPair, name) -> int:
    n = p.n_tokens()
    idx = [] if p.method == "share" else p.data["retain_idx"].tolist()
    if name == "retained":  # a retained (non-sink) token is the first loaded row
        return idx[len(idx) // 2] if idx else n // 2
    if name == "after_retained":
        return next((i + 1 for i in idx if i + 1 not in idx and i + 1 < n), n // 3)
    return {"mid": n // 2, "third": n // 3, "last": n - 1, "sink": 1, "all": n}.get(name, name)


def _buffers(p: CompressedPair, dtype=None):
    """NaN-filled (k_a, v_a, k_b, v_b) buffers of capacity START + tokens + TAIL."""
    dtype = dtype or p.dtype
    shapes = [p.kv_shape(kv) for kv in ("k", "v")] * 2
    return [torch.full((b, h, START + n + TAIL, d), float("nan"), dtype=dtype) for b, h, n, d in shapes]


def _views(bufs, n, skips):
    rows = [slice(START + s, START + n) for s in skips]
    return tuple(None if s == n else (bufs[2 * i][:, :, rows[i]], bufs[2 * i + 1][:, :, rows[i]])
                 for i, s in enumerate(skips))


def _reference(p: CompressedPair):
    """Both layers' KV from the stored tensors in float64 (the expansion's definition, independently)."""
    d = p.data
    if p.method == "share":
        return [[d["k"].double(), d["v"].double()]] * 2
    out = [[None, None], [None, None]]
    idx = d["retain_idx"].long()
    for j, kv in enumerate(("k", "v")):
        b, h, n, hd = p.kv_shape(kv)
        for s, side in enumerate(("a", "b")):
            if p.method == "svd":
                x = (d[f"{kv}_coef"].double() @ d[f"{kv}_basis"].double())[..., s * h * hd:(s + 1) * h * hd]
                x = x.reshape(b, n, h, hd).permute(0, 2, 1, 3).clone()
            else:
                x = d[f"{kv}_dir"].double() * d[f"{kv}_norm_{side}"].double()[..., None]
            x[:, :, idx] = d[f"{kv}_ret_{side}"].double()
            out[s][j] = x
    return out


def _accumulation(p: CompressedPair) -> float:
    """What a float32 product coef @ basis of inner size r may add to one rounding of its result
    (the standard bound r * eps32 * max(|coef| @ |basis|)), the largest over k and v; 0 for the
    methods that multiply nothing. The summation order is the BLAS kernel's: it differs between CPUs
    (AVX-512 and AVX2 machines round a 16-term sum differently), so one rounding is not a bound."""
    if p.method != "svd":
        return 0.0
    d, eps32 = p.data, torch.finfo(torch.float32).eps
    return max(d[f"{kv}_coef"].shape[-1] * eps32
               * float((d[f"{kv}_coef"].double().abs() @ d[f"{kv}_basis"].double().abs()).max())
               for kv in ("k", "v"))


def _assert_placed(bufs, p, skips, want, exact, extra: float = 0.0):
    n = p.n_tokens()
    for s, skip in enumerate(skips):
        for j in range(2):
            buf = bufs[2 * s + j]
            got = buf[:, :, START + skip:START + n]
            ref = want[s][j][:, :, skip:]
            if exact:
                assert torch.equal(got, ref.to(got.dtype)), (s, j)
            else:  # one rounding of the KV dtype at the segment's magnitude (plus `extra`)
                tol = torch.finfo(got.dtype).eps * float(ref.abs().max()) + extra if ref.numel() else 0.0
                torch.testing.assert_close(got.double(), ref.double(), rtol=torch.finfo(got.dtype).eps, atol=tol)
            assert buf[:, :, :START + skip].isnan().all() and buf[:, :, START + n:].isnan().all(), (s, j)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", list(METHODS))
def test_place_equals_expand_at_loaded_rows_only(method, dtype):
    """For every method and skip pattern, placing writes expand()[:, :, skip:] (and the float64
    reference within one rounding and a float32 product's accumulation) at the loaded rows and
    leaves every other buffer row NaN."""
    p = _pair(method, dtype)
    full = p.expand()
    ref = _reference(p)
    exact = method in ("share", "merge")  # copies and single products: bit-exact
    for names in SKIPS:
        skips = tuple(_skip(p, s) for s in names)
        bufs = _buffers(p)
        place_pair(p, _views(bufs, p.n_tokens(), skips), skips)
        _assert_placed(bufs, p, skips, full, exact)
        _assert_placed(bufs, p, skips, ref, exact=False, extra=_accumulation(p))


def test_expand_matches_float64_reference_and_is_fresh():
    """expand() is the float64 reconstruction within one rounding (fp32 svd within fp32 rounding),
    and returns contiguous tensors aliasing neither the payload nor each other."""
    for method in ("svd", "merge", "share"):
        p = _pair(method, torch.float32)
        out = p.expand()
        for s in range(2):
            for j in range(2):
                x, ref = out[s][j], _reference(p)[s][j]
                torch.testing.assert_close(x.double(), ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))
                assert x.is_contiguous()
        ptrs = {t.untyped_storage().data_ptr() for layer in out for t in layer}
        assert len(ptrs) == 4 and not ptrs & {t.untyped_storage().data_ptr() for t in p.data.values()}


def test_other_dtype_views_get_the_rounded_reconstruction():
    """Views of another dtype than the payload's get expand() converted to their dtype."""
    p = _pair("svd", torch.float32)
    bufs = _buffers(p, dtype=torch.bfloat16)
    skips = (7, 0)
    place_pair(p, _views(bufs, p.n_tokens(), skips), skips)
    full = [[x.to(torch.bfloat16) for x in layer] for layer in p.expand()]
    _assert_placed(bufs, p, skips, full, exact=True)


def test_bad_views_and_skips_are_refused():
    """A view of the wrong shape, a skip outside [0, tokens] or a wrong number of layers raise."""
    p = _pair("merge", torch.float32)
    bufs = _buffers(p)
    n = p.n_tokens()
    with pytest.raises(ValueError, match="expected"):
        place_pair(p, _views(bufs, n, (0, 0)), (1, 0))
    with pytest.raises(ValueError, match="skip"):
        place_pair(p, (None, None), (0, n + 1))
    with pytest.raises(ValueError, match="one out and one skip"):
        place_pair(p, (None,), (0,))


# ---------------------------------------------------------------------------------------------
# Contracts: what a bf16 placement does, op by op
# ---------------------------------------------------------------------------------------------
_MATMULS = {"mm", "bmm", "addmm", "baddbmm", "addbmm", "matmul", "mv", "dot", "linear", "_addmm_activation"}
_MIB = 1 << 20


class _Ops(TorchDispatchMode):
    """Records (name, tensor args, out tensors written, result tensors) of every aten op."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        flat = [a for a in list(args) + list(kwargs.values()) for a in (a if isinstance(a, (list, tuple)) else [a])]
        inputs = [a for a in flat if isinstance(a, torch.Tensor)]
        written = [kwargs["out"]] if isinstance(kwargs.get("out"), torch.Tensor) else []
        if name.endswith("_") and inputs:  # in-place: writes its first argument
            written.append(args[0])
        results = [r for r in (result if isinstance(result, (list, tuple)) else [result])
                   if isinstance(r, torch.Tensor)]
        self.ops.append((name, inputs, written, results, func))
        return result


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


CONTRACT_SHAPE = (1, 4, 1024, 64)  # the full fp32 expansion of one K: 1024 x 512 x 4 B = 2 MiB


@pytest.mark.parametrize("method", ["svd", "merge", "share"])
def test_bf16_placement_contracts(method):
    """bf16 payload on the CPU: matmuls take bf16 inputs with K and leading dims multiples of 8 on
    16-byte aligned rows; no op makes an fp32 tensor > 1 MiB; the output-sized writes (bmm / mul /
    copy_ out=) land in the buffers; the only new tensors are the documented pads (svd: coef
    (n_loaded, r8) and basis (r8, width)) and retained-row temporaries, each smaller than one layer's
    loaded K."""
    kwargs = {"svd": {"ranks": (37, 45), "retain_ratio": 0.02, "sink_tokens": 1},
              "merge": {"retain_ratio": 0.02, "sink_tokens": 1}, "share": {}}[method]
    g = torch.Generator().manual_seed(3)
    kv_a = tuple(torch.randn(*CONTRACT_SHAPE, generator=g).to(torch.bfloat16) for _ in range(2))
    kv_b = tuple(torch.randn(*CONTRACT_SHAPE, generator=g).to(torch.bfloat16) for _ in range(2))
    p = compress_pair(method, kv_a, kv_b, 0, 1, **kwargs)
    b, h, n, hd = CONTRACT_SHAPE
    assert n * 2 * h * hd * 4 > _MIB  # what an fp32 expansion of one K would take
    skips = (0, 301) if method != "svd" else (0, int(p.data["retain_idx"][len(p.data["retain_idx"]) // 2]))
    bufs = _buffers(p)
    buf_ptrs = {_storage(x) for x in bufs}
    known = buf_ptrs | {_storage(t) for t in p.data.values()}
    loaded_k_bytes = min(h * (n - s) * hd * 2 for s in skips)
    views = _views(bufs, n, skips)
    with _Ops() as rec:
        place_pair(p, views, skips)
    _assert_placed(bufs, p, skips, _reference(p), exact=False)

    matmuls, big_writes, fresh = 0, 0, []
    for name, inputs, written, results, func in rec.ops:
        for r in results:  # no large fp32 temporary
            assert not (r.dtype == torch.float32 and r.numel() * 4 > _MIB), (name, tuple(r.shape))
        if name in _MATMULS:
            matmuls += 1
            a, m = inputs[0], inputs[1]
            out = written[0] if written else results[0]
            assert all(t.dtype == torch.bfloat16 for t in (a, m, out)), name
            assert a.shape[-1] % 8 == 0, ("inner dim (rank) not a multiple of 8", tuple(a.shape))
            for t in (a, m, out):
                assert t.stride(-1) == 1 and t.stride(-2) % 8 == 0, (name, t.stride())
                assert t.storage_offset() * t.element_size() % 16 == 0, (name, t.storage_offset())
        for w in written:
            if w.numel() >= h * (n - max(skips)) * hd:  # an output-sized write goes into a buffer
                assert _storage(w) in buf_ptrs, (name, tuple(w.shape))
                big_writes += 1
        for r in results:
            ptr = _storage(r)
            if ptr not in known and all(_storage(t) != ptr for t in inputs):
                fresh.append((name, r.untyped_storage().nbytes()))
                known.add(ptr)
    assert all(nbytes < loaded_k_bytes for _, nbytes in fresh), fresh
    assert big_writes >= 4  # K and V of both layers
    if method == "svd":
        assert matmuls == 4 * b  # one bmm per layer, K/V and batch element
        r8 = [math.ceil(r / 8) * 8 for r in (37, 45)]
        pads = sum(nbytes for name, nbytes in fresh if name == "constant_pad_nd")
        assert pads <= 2 * sum(r * (n - min(skips) + 2 * h * hd) for r in r8)
    else:
        assert matmuls == 0


@pytest.mark.parametrize("method", ["svd", "merge"])
def test_retained_rows_write_is_order_independent(method):
    """The retained-token write (no host sync, so rows before the view are redirected to row 0)
    gives every duplicate target row the same source: the result cannot depend on write order."""
    p = _pair(method, torch.float32)
    idx = p.data["retain_idx"].tolist()
    checked = 0
    for skip in (idx[len(idx) // 2], idx[len(idx) // 2] + 1, 1, 2):  # on / just past a retained token
        bufs = _buffers(p)
        with _Ops() as rec:
            place_pair(p, _views(bufs, p.n_tokens(), (skip, skip)), (skip, skip))
        for name, inputs, written, _, func in rec.ops:
            if name == "index_copy_":
                _, index, source = inputs
                for pos in index.unique():
                    rows = source[:, :, index == pos]
                    assert torch.equal(rows, rows[:, :, :1].expand_as(rows)), (skip, int(pos))
                    checked += int(rows.shape[2] > 1)
        _assert_placed(bufs, p, (skip, skip), p.expand(), exact=method == "merge")
    assert checked  # some skips did redirect earlier retained tokens


def test_share_writes_both_layers_from_one_payload():
    """share: both layers' views are copied from the one stored K and V (no clone, no other source)."""
    p = _pair("share", torch.bfloat16)
    bufs = _buffers(p)
    skips = (0, 9)
    with _Ops() as rec:
        place_pair(p, _views(bufs, p.n_tokens(), skips), skips)
    copies = [(inputs, written) for name, inputs, written, _, _ in rec.ops if name == "copy_"]
    assert len(copies) == 4 and not any(name == "clone" for name, *_ in rec.ops)
    sources = {_storage(inputs[1]) for inputs, _ in copies}
    assert sources == {_storage(p.data["k"]), _storage(p.data["v"])}
    assert {_storage(w[0]) for _, w in copies} == {_storage(x) for x in bufs}
    _assert_placed(bufs, p, skips, [[p.data["k"], p.data["v"]]] * 2, exact=True)


# ---------------------------------------------------------------------------------------------
# restore._place: a multi-turn state's items into a BufferCache
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["svd", "merge", "share"])
def test_restore_place_writes_loaded_rows_like_load_layers(method):
    """restore._place fills each layer's rows [L_l, N) as load_layers expands them (pairs whose two
    layers skip different counts, items cropped by a second turn, exact gap items) and nothing else."""
    from krul.restore import BufferCache, _make_jobs, _place, load_layers
    from krul.store import build_state

    g = torch.Generator().manual_seed(5)
    n1, n2, layers = 24, 40, 4
    kvs = [tuple(torch.randn(1, 2, n2, 8, generator=g) for _ in range(2)) for _ in range(layers)]
    ids = torch.arange(n2)
    kwargs = {"svd": {"rank_ratio": 0.5, "retain_ratio": 0.1}, "merge": {"retain_ratio": 0.1}, "share": {}}[method]
    first = build_state({}, ids[:n1], kvs, [10, 6, 3, 0], None, pairs=[(0, 1), (2, 3)], method=method,
                        compress_kwargs=kwargs)
    state = build_state({}, ids, kvs, [30, 21, 9, 0], first, pairs=[(0, 1), (2, 3)], method=method,
                        compress_kwargs=kwargs)
    cache = BufferCache(layers, 2, 8, n2 + 4, torch.float32, "cpu")
    for layer in range(layers):
        for buf in cache.buffers(layer):
            buf.fill_(float("nan"))
    for job in _make_jobs(state):
        _place(job, dict(zip(job.names, job.sources)), cache, state.recompute_lengths)
    for layer, (ref, begin) in enumerate(zip(load_layers(state, torch.device("cpu")), state.recompute_lengths)):
        for buf, want in zip(cache.buffers(layer), ref or (None, None)):
            if want is not None:
                assert torch.equal(buf[:, :, begin:n2], want), layer
            assert buf[:, :, :begin].isnan().all() and buf[:, :, n2:].isnan().all(), layer
