"""Tensor-only tests of cross-layer KV compression (krul.compression)."""
import math

import pytest
import torch

from krul.compression import (CompressedPair, compress_pair, full_nbytes, merge_pair, share_pair,
                              svd_pair, svd_rank)

B, H, T, D = 1, 4, 200, 64


def kv(seed, shape=(B, H, T, D), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype), torch.randn(*shape, generator=g).to(dtype)


def correlated_pair(seed=0, sigma=0.3, dtype=torch.float32, shape=(B, H, T, D)):
    """Layer b = layer a + sigma * noise (per-vector angle ~ atan(sigma) ~ 0.29 rad for 0.3)."""
    g = torch.Generator().manual_seed(seed + 1000)
    k_a, v_a = kv(seed, shape)
    k_b = k_a + sigma * torch.randn(*shape, generator=g)
    v_b = v_a + sigma * torch.randn(*shape, generator=g)
    return (k_a.to(dtype), v_a.to(dtype)), (k_b.to(dtype), v_b.to(dtype))


def rel_err(x, ref):
    return float((x.double() - ref.double()).norm() / ref.double().norm())


def max_unretained_angle(x_a, x_b, retained):
    cos = torch.nn.functional.cosine_similarity(x_a.double(), x_b.double(), dim=-1).clamp(-1, 1)
    omega = torch.arccos(cos)  # (B, H, T)
    keep = torch.ones(omega.shape[2], dtype=torch.bool)
    keep[retained.long()] = False
    return float(omega[:, :, keep].max())


def test_share_round_trip_and_independent_copies():
    """share: both layers expand to a's KV exactly, and b's copy is independent of a's."""
    kv_a, kv_b = kv(0), kv(1)
    p = share_pair(kv_a, kv_b, 2, 5)
    (k_a, v_a), (k_b, v_b) = p.expand()
    for x, ref in ((k_a, kv_a[0]), (v_a, kv_a[1]), (k_b, kv_a[0]), (v_b, kv_a[1])):
        assert torch.equal(x, ref)
    k_b.add_(1.0)
    v_b.zero_()
    assert torch.equal(k_a, kv_a[0]) and torch.equal(v_a, kv_a[1])
    assert torch.equal(p.expand()[0][0], kv_a[0])  # the stored data is untouched too


def test_merge_expand_does_not_alias():
    """merge: an in-place write into one expanded layer changes neither the other nor the store."""
    kv_a, kv_b = correlated_pair(1)
    p = merge_pair(kv_a, kv_b, 0, 1, retain_ratio=0.1)
    (k_a, _), (k_b, _) = p.expand()
    before_b = k_b.clone()
    k_a.fill_(7.0)
    assert torch.equal(k_b, before_b)
    assert not torch.equal(p.expand()[0][0], k_a)


def test_merge_identical_layers_is_exact():
    """merge of two identical layers reconstructs both within float tolerance."""
    kv_a = kv(2)
    p = merge_pair(kv_a, kv_a, 0, 1, retain_ratio=0.0)
    (k_a, v_a), (k_b, v_b) = p.expand()
    for x, ref in ((k_a, kv_a[0]), (v_a, kv_a[1]), (k_b, kv_a[0]), (v_b, kv_a[1])):
        torch.testing.assert_close(x, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("retain_ratio", [0.0, 0.05, 0.2])
def test_merge_error_bound_and_exact_retained(retain_ratio):
    """merge: relative error per layer <= 2 sin(omega_max / 4) <= 0.16 at sigma 0.3; retained exact."""
    kv_a, kv_b = correlated_pair(3)
    p = merge_pair(kv_a, kv_b, 0, 1, retain_ratio=retain_ratio)
    idx = p.data["retain_idx"].long()
    assert idx.numel() == math.ceil(retain_ratio * T)
    out = p.expand()
    for side, (kv_ref, kv_out) in enumerate(((kv_a, out[0]), (kv_b, out[1]))):
        for j in range(2):
            err = rel_err(kv_out[j], kv_ref[j])
            # Exact geometry: a non-retained token's error is ||x|| * 2 sin(t * omega / 2), t = 0.5.
            omega = max_unretained_angle(kv_a[j], kv_b[j], idx)
            assert err <= 2 * math.sin(omega / 4) + 1e-5, (side, j, err, omega)
            assert err <= 0.16, (side, j, err)  # measured 0.128-0.145 for sigma = 0.3, D = 64
            assert torch.equal(kv_out[j][:, :, idx], kv_ref[j][:, :, idx])


def test_merge_retains_most_dissimilar_tokens():
    """Retention keeps the tokens where the layers disagree most."""
    kv_a, kv_b = correlated_pair(4, sigma=0.05)
    flipped = [7, 50, 123]
    for x in kv_b:
        x[:, :, flipped] = -x[:, :, flipped]
    p = merge_pair(kv_a, kv_b, 0, 1, retain_ratio=3 / T)
    assert p.data["retain_idx"].tolist() == flipped


def test_merge_retain_all_is_exact():
    """retain_ratio = 1 reproduces both layers bit-exactly."""
    kv_a, kv_b = correlated_pair(5, sigma=1.0)
    (k_a, v_a), (k_b, v_b) = merge_pair(kv_a, kv_b, 0, 1, retain_ratio=1.0).expand()
    assert torch.equal(k_a, kv_a[0]) and torch.equal(v_a, kv_a[1])
    assert torch.equal(k_b, kv_b[0]) and torch.equal(v_b, kv_b[1])


def test_nbytes_exact_and_below_two_layers():
    """nbytes = sum(numel * element_size) of stored tensors; merge at retain 0.05 stores ~0.566 of two layers."""
    kv_a, kv_b = correlated_pair(6)
    p = merge_pair(kv_a, kv_b, 0, 1, retain_ratio=0.05)
    assert p.nbytes() == sum(t.numel() * t.element_size() for t in p.tensors().values())
    two_layers = full_nbytes(kv_a) + full_nbytes(kv_b)
    # directions 1/2 + norms 4/(4D) + retained 4r/4 + int32 indices: 0.5 + 1/D + r (+ tiny)
    assert p.nbytes() / two_layers == pytest.approx(0.5 + 1 / D + 0.05, abs=1e-3)
    assert p.nbytes() < two_layers
    s = share_pair(kv_a, kv_b, 0, 1)
    assert s.nbytes() == full_nbytes(kv_a) == two_layers // 2


@pytest.mark.parametrize("method", ["share", "merge", "svd"])
@pytest.mark.parametrize("start", [0, 1, 37, 100, T - 1, T])
def test_crop_left_equals_sliced_expand(method, start):
    """crop_left(start).expand() equals expand() sliced to tokens [start:]."""
    kv_a, kv_b = correlated_pair(7)
    p = compress_pair(method, kv_a, kv_b, 3, 4, **({"retain_ratio": 0.1} if method != "share" else {}))
    c = p.crop_left(start)
    assert c.n_tokens() == T - start
    full, cropped = p.expand(), c.expand()
    for side in range(2):
        for j in range(2):
            assert torch.equal(cropped[side][j], full[side][j][:, :, start:])
    if method != "share":
        assert torch.all(c.data["retain_idx"] >= 0)
        assert c.data["retain_idx"].dtype == torch.int32
    assert c.nbytes() <= p.nbytes()


@pytest.mark.parametrize("method", ["share", "merge", "svd"])
def test_tensors_round_trip(method):
    """tensors() + meta() -> from_tensors rebuilds an identical pair (string meta accepted)."""
    kv_a, kv_b = correlated_pair(8)
    p = compress_pair(method, kv_a, kv_b, 1, 6)
    meta = {k: str(v) for k, v in p.meta().items()}  # safetensors metadata is str -> str
    tensors = {k: v.clone() for k, v in p.tensors().items()}
    r = CompressedPair.from_tensors(tensors, meta)
    assert (r.method, r.layer_a, r.layer_b, r.t) == (p.method, p.layer_a, p.layer_b, p.t)
    assert r.tensors().keys() == p.tensors().keys()
    for k in p.tensors():
        assert torch.equal(r.tensors()[k], p.tensors()[k])
    assert r.nbytes() == p.nbytes()


@pytest.mark.parametrize("method", ["share", "merge"])
def test_bf16_input(method):
    """bf16 KV compresses and expands in bf16 within the merge error bound."""
    kv_a, kv_b = correlated_pair(9, dtype=torch.bfloat16)
    p = compress_pair(method, kv_a, kv_b, 0, 1)
    assert all(t.dtype == torch.bfloat16 for n, t in p.tensors().items() if n != "retain_idx")
    out = p.expand()
    assert out[1][0].dtype == torch.bfloat16
    assert rel_err(out[0][0], kv_a[0]) <= (0.0 if method == "share" else 0.16)


def test_empty_token_range():
    """A zero-token segment compresses, counts bytes and expands to empty tensors."""
    kv_a, kv_b = kv(10, (B, H, 0, D)), kv(11, (B, H, 0, D))
    for method in ("share", "merge", "svd"):
        p = compress_pair(method, kv_a, kv_b, 0, 1)
        assert p.n_tokens() == 0 and p.nbytes() == 0
        (k_a, _), (k_b, _) = p.expand()
        assert k_a.shape == k_b.shape == (B, H, 0, D)


def test_to_moves_every_tensor():
    """to(device) returns a pair whose tensors are all on that device."""
    kv_a, kv_b = correlated_pair(12)
    p = merge_pair(kv_a, kv_b, 0, 1).to("meta")
    assert all(t.device.type == "meta" for t in p.tensors().values())


def test_invalid_arguments():
    """Bad retain_ratio, unknown method and mismatched shapes are ValueErrors that say why."""
    kv_a, kv_b = correlated_pair(13)
    with pytest.raises(ValueError, match="retain_ratio"):
        merge_pair(kv_a, kv_b, 0, 1, retain_ratio=1.5)
    with pytest.raises(ValueError, match="share, merge"):
        compress_pair("quantize", kv_a, kv_b, 0, 1)
    with pytest.raises(ValueError, match="shapes differ"):
        merge_pair(kv_a, (kv_b[0][:, :, :10], kv_b[1][:, :, :10]), 0, 1)


def test_layer_angles_identical_orthogonal_and_symmetric():
    from krul.compression import layer_angles

    torch.manual_seed(0)
    k = torch.randn(1, 2, 5, 4)
    v = torch.randn(1, 2, 5, 4)
    # layer 2: same directions as layer 0 scaled (angle 0); layer 1: orthogonal to layer 0
    k_orth = torch.stack([-k[..., 1], k[..., 0], -k[..., 3], k[..., 2]], dim=-1)
    v_orth = torch.stack([-v[..., 1], v[..., 0], -v[..., 3], v[..., 2]], dim=-1)
    ang = layer_angles([(k, v), (k_orth, v_orth), (3 * k, 2 * v)])
    assert ang.shape == (3, 3)
    assert torch.allclose(ang, ang.T)
    assert torch.allclose(ang.diagonal(), torch.zeros(3, dtype=torch.float64))
    assert abs(ang[0, 2]) < 1e-6
    assert abs(ang[0, 1] - torch.pi / 2) < 1e-6


def test_merge_keeps_sink_tokens_exact_by_absolute_position():
    torch.manual_seed(1)
    kv_a = (torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8))
    kv_b = (torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8))
    for offset, forced in ((0, [0, 1, 2]), (2, [0]), (5, [])):
        pair = merge_pair(kv_a, kv_b, 0, 1, retain_ratio=0.1, sink_tokens=3, offset=offset)
        idx = pair.data["retain_idx"].tolist()
        assert set(forced) <= set(idx)
        assert len(idx) == 2 + len(forced)  # ceil(0.1 * 20) by angle, plus the sinks
        (ka, va), (kb, vb) = pair.expand()
        for i in forced:
            assert torch.equal(ka[:, :, i], kv_a[0][:, :, i]) and torch.equal(vb[:, :, i], kv_b[1][:, :, i])
    with pytest.raises(ValueError, match="sink_tokens"):
        merge_pair(kv_a, kv_b, 0, 1, sink_tokens=-1)


def low_rank_pair(rank, seed=0, noise=0.0, shape=(B, H, T, D), dtype=torch.float32):
    """Two layers whose token vectors (all heads, both layers) span `rank` shared directions,
    each layer through its own unrelated map (their per-token angles are ~pi/2), plus noise."""
    g = torch.Generator().manual_seed(seed)
    b, h, t, d = shape
    out = []
    for _ in range(2):  # K, V
        z = torch.randn(b, t, rank, generator=g)
        x = z @ torch.randn(rank, 2 * h * d, generator=g) + noise * torch.randn(b, t, 2 * h * d, generator=g)
        out.append([x[..., i * h * d:(i + 1) * h * d].reshape(b, t, h, d).permute(0, 2, 1, 3).to(dtype)
                    for i in range(2)])
    (k_a, k_b), (v_a, v_b) = out
    return (k_a.contiguous(), v_a.contiguous()), (k_b.contiguous(), v_b.contiguous())


def test_svd_rank_fits_the_byte_fraction():
    """Coefficients + basis stay within rank_ratio of the exact elements; rank >= 1, <= min(n, width)."""
    for n in (1, 5, 64, 200, 5000):
        for width in (128, 512):
            for f in (0.25, 0.5, 0.75, 1.0):
                r = svd_rank(n, width, f)
                assert 1 <= r <= min(n, width)
                if r > 1:
                    assert r * (n + width) <= f * n * width + 1e-6
    assert svd_rank(0, 512, 0.5) == 0


def test_svd_exact_on_shared_low_rank_layers():
    """Layers that are near-orthogonal per token (a merge loses ~77%) but share a rank-8 token
    subspace are reconstructed exactly by one rank >= 8 token tensor."""
    kv_a, kv_b = low_rank_pair(8)
    p = svd_pair(kv_a, kv_b, 2, 9, rank_ratio=0.5, sink_tokens=0)
    assert p.rank >= 8
    (k_a, v_a), (k_b, v_b) = p.expand()
    for x, ref in ((k_a, kv_a[0]), (v_a, kv_a[1]), (k_b, kv_b[0]), (v_b, kv_b[1])):
        assert rel_err(x, ref) < 1e-5
    merged = merge_pair(kv_a, kv_b, 2, 9, retain_ratio=0.0).expand()
    assert rel_err(merged[0][0], kv_a[0]) > 0.5


@pytest.mark.parametrize("rank_ratio", [0.25, 0.5, 0.75])
def test_svd_error_is_the_tail_singular_mass(rank_ratio):
    """The joint relative error over the fitted tokens equals the tail singular-value mass of the
    concatenated [layer a | layer b] token matrix (Eckart-Young), computed independently."""
    kv_a, kv_b = low_rank_pair(40, seed=3, noise=0.3)
    p = svd_pair(kv_a, kv_b, 0, 1, rank_ratio=rank_ratio, sink_tokens=0)
    (k_a, _), (k_b, _) = p.expand()
    flat = lambda x: x.permute(0, 2, 1, 3).reshape(B, T, -1).double()
    ref = torch.cat([flat(kv_a[0]), flat(kv_b[0])], -1)
    got = torch.cat([flat(k_a), flat(k_b)], -1)
    s = torch.linalg.svdvals(ref[0])
    tail = float((s[p.rank:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())
    assert rel_err(got, ref) == pytest.approx(tail, rel=1e-3, abs=1e-5)
    assert p.rank == svd_rank(T, 2 * H * D, rank_ratio)


def test_svd_sink_and_retained_tokens_exact_and_bytes_counted():
    """Sink tokens (absolute positions) and retained tokens come back bit-exact; the stored bytes
    are the coefficients, bases, indices and exact tokens, within rank_ratio of the pair plus
    the exact tokens."""
    kv_a, kv_b = low_rank_pair(40, seed=4, noise=0.5)
    kv_a[0][:, :, :3] *= 30  # a sink-like outlier
    p = svd_pair(kv_a, kv_b, 0, 1, rank_ratio=0.5, sink_tokens=3, retain_ratio=0.05)
    idx = p.data["retain_idx"].long()
    assert idx[:3].tolist() == [0, 1, 2] and idx.numel() == 3 + math.ceil(0.05 * (T - 3))
    (k_a, v_a), (k_b, v_b) = p.expand()
    for x, ref in ((k_a, kv_a[0]), (v_a, kv_a[1]), (k_b, kv_b[0]), (v_b, kv_b[1])):
        assert torch.equal(x[:, :, idx], ref[:, :, idx])
    exact_pair = full_nbytes(kv_a) + full_nbytes(kv_b)
    per_token = exact_pair / T
    assert p.nbytes() <= 0.5 * exact_pair + idx.numel() * (per_token + 4)
    # sinks by absolute position: a later segment (offset past them) keeps none
    later = svd_pair(kv_a, kv_b, 0, 1, sink_tokens=3, offset=3)
    assert later.data["retain_idx"].numel() == 0


def test_svd_bf16_and_invalid_arguments():
    kv_a, kv_b = low_rank_pair(8, seed=5, dtype=torch.bfloat16)
    p = svd_pair(kv_a, kv_b, 0, 1)
    assert all(t.dtype == torch.bfloat16 for n, t in p.tensors().items() if n != "retain_idx")
    assert rel_err(p.expand()[1][1], kv_b[1]) < 0.02
    with pytest.raises(ValueError, match="rank_ratio"):
        svd_pair(kv_a, kv_b, 0, 1, rank_ratio=0.0)
    with pytest.raises(ValueError, match="sink_tokens"):
        svd_pair(kv_a, kv_b, 0, 1, sink_tokens=-1)


def test_svd_value_share_splits_the_rank_budget_and_options_are_checked():
    kv_a, kv_b = low_rank_pair(40, seed=6, noise=0.3)
    even = svd_pair(kv_a, kv_b, 0, 1, rank_ratio=0.4)
    more_v = svd_pair(kv_a, kv_b, 0, 1, rank_ratio=0.4, value_share=0.6)
    assert even.data["k_coef"].shape[-1] == even.data["v_coef"].shape[-1]
    assert more_v.data["v_coef"].shape[-1] > even.data["v_coef"].shape[-1] > more_v.data["k_coef"].shape[-1]
    with pytest.raises(ValueError, match="value_share"):
        svd_pair(kv_a, kv_b, 0, 1, value_share=1.0)
    with pytest.raises(ValueError, match="retain_by"):
        svd_pair(kv_a, kv_b, 0, 1, retain_by="norm")


def _measured_loss(kv_a, kv_b, rank_ratio, sink_tokens, offset=0, reduce="joint"):
    """Mean over K and V of the relative squared error of an svd pair (no retained tokens) on its
    fit tokens, measured from its expansion: of the pair ("joint") or the mean of each layer's."""
    p = svd_pair(kv_a, kv_b, 0, 1, rank_ratio=rank_ratio, sink_tokens=sink_tokens, retain_ratio=0.0,
                 offset=offset)
    n_sink = max(0, sink_tokens - offset)
    out = []
    for got, ref in zip(zip(*p.expand()), zip(kv_a, kv_b)):  # (K of a, K of b), then V
        num = [float((g - r)[:, :, n_sink:].double().pow(2).sum()) for g, r in zip(got, ref)]
        den = [float(r[:, :, n_sink:].double().pow(2).sum()) for r in ref]
        per = [num[0] / den[0], num[1] / den[1]]
        out.append({"joint": sum(num) / sum(den), "layers": 0.5 * sum(per), "none": per[0]}[reduce])
    return sum(out) / 2


@pytest.mark.parametrize("reduce", ["joint", "layers", "none"])
@pytest.mark.parametrize("rank_ratio,sink,offset", [(0.3, 1, 0), (0.6, 2, 0), (0.47, 1, 5)])
def test_svd_pair_losses_equal_what_svd_pair_loses(rank_ratio, sink, offset, reduce):
    """Every pair's spectral loss is the error svd_pair (float32) really makes on that pair (exact basis),
    of the pair or per layer; layers of very different norms included."""
    from krul.compression import svd_pair_losses

    shape = (1, 2, 60, 8)
    layers = [kv(s, shape) for s in range(3)] + [low_rank_pair(3, seed=7, noise=0.05, shape=shape)[0]]
    layers[2] = (0.05 * layers[2][0], 3.0 * layers[2][1])
    losses = svd_pair_losses(layers, rank_ratio=rank_ratio, sink_tokens=sink, offset=offset, reduce=reduce)
    assert losses.shape == (4, 4) and torch.isnan(losses.diagonal()).all()
    assert torch.equal(losses.nan_to_num(0), losses.nan_to_num(0).T) == (reduce != "none")
    for a in range(4):
        for b in range(a + 1, 4):
            assert float(losses[a, b]) == pytest.approx(
                _measured_loss(layers[a], layers[b], rank_ratio, sink, offset, reduce), rel=1e-4, abs=1e-8)
            if reduce == "none":  # layer b's own error when paired with a
                assert float(losses[b, a]) == pytest.approx(
                    _measured_loss(layers[b], layers[a], rank_ratio, sink, offset, reduce), rel=1e-4, abs=1e-8)


def test_svd_pair_losses_truncated_basis_is_an_upper_bound_and_layers_restrict():
    from krul.compression import svd_pair_losses

    shape = (1, 2, 80, 16)  # w = 32 axes per layer
    layers = [low_rank_pair(6, seed=s, noise=0.2, shape=shape)[0] for s in range(4)]
    exact = svd_pair_losses(layers, rank_ratio=0.4)
    for k in (8, 16, 24):
        approx = svd_pair_losses(layers, rank_ratio=0.4, basis_dim=k)
        off = ~torch.eye(4, dtype=torch.bool)
        assert (approx[off] >= exact[off] - 1e-9).all()
    assert torch.allclose(svd_pair_losses(layers, rank_ratio=0.4, basis_dim=32), exact, equal_nan=True)
    some = svd_pair_losses(layers, rank_ratio=0.4, layers=[1, 3])
    assert float(some[1, 3]) == pytest.approx(float(exact[1, 3]))
    assert int((~torch.isnan(some)).sum()) == 2
    assert torch.isnan(svd_pair_losses(layers[:1], rank_ratio=0.4)).all()
    with pytest.raises(ValueError, match="out of range"):
        svd_pair_losses(layers, layers=[0, 7])
    with pytest.raises(ValueError, match="reduce"):
        svd_pair_losses(layers, reduce="max")


def _sq_err(pair, kv_a, kv_b, weights=(1.0, 1.0), relative=False):
    """Sum over K and V of w_a e_a + w_b e_b, e_l layer l's squared error (relative: over its energy)."""
    total = 0.0
    for got, ref, w in zip(pair.expand(), (kv_a, kv_b), weights):
        for x, r in zip(got, ref):
            e = float((x.double() - r.double()).pow(2).sum())
            total += w * (e / float(r.double().pow(2).sum()) if relative else e)
    return total


def _alloc_jobs(shape=(1, 1, 12, 4)):
    """Two pairs with different spectra: one nearly rank 1, one spread over many directions."""
    return [(0, 1, *low_rank_pair(1, seed=21, noise=0.05, shape=shape), 0),
            (2, 3, *low_rank_pair(6, seed=22, noise=0.5, shape=shape), 0)]


def test_segment_rank_allocation_is_the_brute_force_optimum_within_the_uniform_bytes():
    """allocate_svd_ranks' ranks minimise the segment's total squared error (the sum of each
    matrix's tail singular mass) over every rank assignment that stores no more than uniform
    ranks, found by enumeration; and the stored pairs are no larger than uniform's."""
    import itertools

    from krul.compression import allocate_svd_ranks, compress_pairs

    jobs = _alloc_jobs()
    ranks = allocate_svd_ranks([(kv_a, kv_b, off, None) for _, _, kv_a, kv_b, off in jobs],
                               rank_ratio=0.5, sink_tokens=0)
    uniform = compress_pairs("svd", jobs, rank_ratio=0.5, sink_tokens=0)
    segment = compress_pairs("svd", jobs, rank_alloc="segment", rank_ratio=0.5, sink_tokens=0)
    assert [(p.data["k_coef"].shape[-1], p.data["v_coef"].shape[-1]) for p in segment] == ranks
    assert sum(p.nbytes() for p in segment) <= sum(p.nbytes() for p in uniform)
    assert ranks != [(p.rank, p.rank) for p in uniform]  # the spectra differ: the ranks move
    flat = lambda x: x.permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1).double()[0]
    spectra = [torch.linalg.svdvals(torch.cat([flat(kv_a[i]), flat(kv_b[i])], -1)).pow(2)
               for _, _, kv_a, kv_b, _ in jobs for i in (0, 1)]
    budget = sum(p.data["k_coef"].shape[-1] + p.data["v_coef"].shape[-1] for p in uniform)
    best = min((sum(float(s[r:].sum()) for s, r in zip(spectra, rs)), rs)
               for rs in itertools.product(*(range(1, s.numel() + 1) for s in spectra)) if sum(rs) <= budget)
    got = [r for pair in ranks for r in pair]
    assert sum(float(s[r:].sum()) for s, r in zip(spectra, got)) == pytest.approx(best[0], rel=1e-9)
    errs = [sum(_sq_err(p, kv_a, kv_b) for p, (_, _, kv_a, kv_b, _) in zip(ps, jobs)) for ps in (uniform, segment)]
    assert errs[1] < errs[0]
    assert errs[1] == pytest.approx(best[0], rel=1e-4)


def test_pairs_rank_allocation_keeps_the_k_and_v_budgets_apart():
    from krul.compression import compress_pairs

    jobs = _alloc_jobs()
    uniform = compress_pairs("svd", jobs, rank_ratio=0.5, sink_tokens=0)
    pairs = compress_pairs("svd", jobs, rank_alloc="pairs", rank_ratio=0.5, sink_tokens=0)
    for kv in ("k_coef", "v_coef"):
        assert sum(p.data[kv].shape[-1] for p in pairs) <= sum(p.data[kv].shape[-1] for p in uniform)
    assert [p.data["k_coef"].shape[-1] for p in pairs] != [p.data["k_coef"].shape[-1] for p in uniform]


def test_basis_weights_lower_the_weighted_relative_error_and_options_are_checked():
    """With basis_weights the basis minimises w_a e_a + w_b e_b (relative errors): no worse on it
    than the joint basis, at the same ranks and bytes; and the options are refused where they do
    not apply."""
    from krul.compression import compress_pairs

    kv_a, kv_b = low_rank_pair(20, seed=23, noise=0.4)
    kv_b = tuple(2.0 * t for t in kv_b)  # layer b dominates the joint error
    w = (4.0, 1.0)
    joint = svd_pair(kv_a, kv_b, 0, 1, rank_ratio=0.3, sink_tokens=0)
    weighted = svd_pair(kv_a, kv_b, 0, 1, rank_ratio=0.3, sink_tokens=0, basis_weights=w)
    assert weighted.nbytes() == joint.nbytes()
    assert (_sq_err(weighted, kv_a, kv_b, w, relative=True)
            < 0.99 * _sq_err(joint, kv_a, kv_b, w, relative=True))
    jobs = [(0, 1, kv_a, kv_b, 0)]
    via = compress_pairs("svd", jobs, basis_weights=[4.0, 1.0], rank_ratio=0.3, sink_tokens=0)[0]
    assert torch.equal(via.data["k_coef"], weighted.data["k_coef"])
    with pytest.raises(ValueError, match="rank_alloc"):
        compress_pairs("svd", jobs, rank_alloc="per-layer")
    with pytest.raises(ValueError, match="svd options"):
        compress_pairs("merge", jobs, rank_alloc="segment")
    with pytest.raises(ValueError, match="basis_weights"):
        svd_pair(kv_a, kv_b, 0, 1, basis_weights=(-1.0, 1.0))


def test_unequal_ranks_and_weighted_bases_crop_and_round_trip():
    """Allocated pairs (K rank != V rank) and weighted bases crop and serialise like uniform ones."""
    from krul.compression import compress_pairs

    jobs = _alloc_jobs(shape=(1, 2, 40, 8))
    for p in compress_pairs("svd", jobs, rank_alloc="segment", basis_weights=[1.0, 2.0, 0.5, 1.0],
                            rank_ratio=0.5, sink_tokens=1, retain_ratio=0.05):
        full = p.expand()
        c = p.crop_left(7)
        for side in range(2):
            for j in range(2):
                assert torch.equal(c.expand()[side][j], full[side][j][:, :, 7:])
        r = CompressedPair.from_tensors({k: v.clone() for k, v in p.tensors().items()},
                                        {k: str(v) for k, v in p.meta().items()})
        assert all(torch.equal(r.tensors()[k], t) for k, t in p.tensors().items())
