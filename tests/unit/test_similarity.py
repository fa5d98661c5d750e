"""Tensor-only tests of the attention-similarity estimator math (krul.similarity)."""
import pytest
import torch

from krul.similarity import SimilarityStats, boundary_mass, layer_pair_sq_distances


def causal_maps(n_layers, n_heads, positions, n_keys, seed=0, dtype=torch.float32):
    """(L, H, q, k) softmax maps; query i sees keys 0..positions[i]."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_layers, n_heads, len(positions), n_keys, generator=g, dtype=torch.float64)
    keys = torch.arange(n_keys)[None, :]
    mask = keys > torch.as_tensor(positions)[:, None]
    logits = logits.masked_fill(mask, float("-inf"))
    return torch.softmax(logits, dim=-1).to(dtype)


def direct_sq_distances(maps):
    m = maps.to(torch.float64)
    diff = m[:, None] - m[None, :]  # (L, L, H, q, k)
    return (diff ** 2).sum(dim=(3, 4))


def direct_boundary(maps, positions, edge_ratio):
    n_layers, n_heads = maps.shape[:2]
    out = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    for i, p in enumerate(positions):
        n_vis = p + 1
        edge = max(1, round(edge_ratio * n_vis))
        keys = sorted(set(range(0, edge)) | set(range(n_vis - edge, n_vis)))
        out += maps[:, :, i, keys].to(torch.float64).sum(-1)
    return out


def test_sq_distances_match_direct_sum():
    """Gram-identity distances equal the direct sum of squared map differences, per head."""
    positions = list(range(20, 32))
    maps = causal_maps(5, 3, positions, 32)
    got = layer_pair_sq_distances(maps)
    assert got.shape == (5, 5, 3) and got.dtype == torch.float64
    torch.testing.assert_close(got, direct_sq_distances(maps), atol=1e-6, rtol=1e-5)


def test_sq_distances_symmetric_zero_diagonal_nonnegative():
    """Distances are symmetric, exactly zero on the diagonal and never negative."""
    maps = causal_maps(6, 2, list(range(10, 26)), 26, seed=1)
    maps[3] = maps[1]  # identical layers: cancellation must not go negative
    d = layer_pair_sq_distances(maps)
    assert torch.equal(d, d.transpose(0, 1))
    assert torch.all(torch.diagonal(d, dim1=0, dim2=1) == 0)
    assert torch.all(d >= 0)
    assert torch.all(d[1, 3] < 1e-6)


def test_sq_distances_independent_of_chunking():
    """Chunked accumulation gives the same sums as one chunk."""
    maps = causal_maps(4, 2, list(range(30, 48)), 48, seed=2)
    whole = layer_pair_sq_distances(maps)
    chunked = layer_pair_sq_distances(maps, chunk_elements=4 * 2 * 48)  # one query per chunk
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)  # float32 chunks


def test_sq_distances_bf16_input():
    """bf16 maps give float64 sums close to the float32 result."""
    maps = causal_maps(4, 2, list(range(16, 24)), 24, seed=3)
    got = layer_pair_sq_distances(maps.to(torch.bfloat16))
    ref = direct_sq_distances(maps.to(torch.bfloat16).float())
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-3)


def test_boundary_mass_matches_explicit_key_sets():
    """Edge mass equals the sum over the explicit union of leading and trailing edge keys."""
    positions = [0, 1, 2, 4, 9, 15, 30, 39]  # small windows make the two edges overlap
    maps = causal_maps(3, 2, positions, 40, seed=4)
    for ratio in (0.1, 0.25, 0.5):
        got = boundary_mass(maps, torch.tensor(positions), edge_ratio=ratio)
        torch.testing.assert_close(got, direct_boundary(maps, positions, ratio), atol=1e-6, rtol=1e-6)


def test_boundary_mass_uniform_attention():
    """Uniform attention over n_vis keys puts 2*edge/n_vis on the edges."""
    n = 50
    maps = torch.full((1, 1, 1, n), 1.0 / n)
    got = boundary_mass(maps, torch.tensor([n - 1]), edge_ratio=0.1)
    assert got.item() == pytest.approx(10 / 50, abs=1e-6)


def test_boundary_mass_rejects_positions_beyond_keys():
    """A query position whose window exceeds k is an error."""
    maps = causal_maps(2, 1, [3], 4)
    with pytest.raises(ValueError, match="query positions"):
        boundary_mass(maps, torch.tensor([4]))


def test_stats_split_updates_and_merge_equal_one_update():
    """Prefill block + decode rows, accumulated apart and merged, equal one update over all rows."""
    positions = list(range(24, 40))
    maps = causal_maps(4, 3, positions, 40, seed=5)
    whole = SimilarityStats.zeros(4, 3)
    whole.update(maps, torch.tensor(positions))
    prefill = SimilarityStats.zeros(4, 3)
    prefill.update(maps[:, :, :10], torch.tensor(positions[:10]))
    decode = SimilarityStats.zeros(4, 3)
    for i in range(10, len(positions)):  # one row per decode step
        decode.update(maps[:, :, i:i + 1], torch.tensor([positions[i]]))
    merged = prefill.merge(decode)
    assert merged.n_queries == whole.n_queries == len(positions)
    torch.testing.assert_close(merged.sq_dist, whole.sq_dist, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(merged.boundary, whole.boundary, atol=1e-6, rtol=1e-6)
    assert prefill.n_queries == 10  # merge leaves its inputs alone


def test_distances_head_reductions():
    """mean/sum/max head reductions follow their definitions; symmetric with zero diagonal."""
    maps = causal_maps(4, 3, list(range(8, 20)), 20, seed=6)
    s = SimilarityStats.zeros(4, 3)
    s.update(maps, torch.arange(8, 20))
    per_head = direct_sq_distances(maps)
    torch.testing.assert_close(s.distances("mean"), per_head.sqrt().mean(-1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(s.distances("sum"), per_head.sum(-1).sqrt(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(s.distances("max"), per_head.sqrt().amax(-1), atol=1e-6, rtol=1e-6)
    for mode in ("mean", "sum", "max"):
        d = s.distances(mode)
        assert d.shape == (4, 4) and torch.equal(d, d.T) and torch.all(d.diagonal() == 0)
    torch.testing.assert_close(s.distances("sum", normalize=True) ** 2,
                               s.distances("sum") ** 2 / 12, atol=1e-9, rtol=1e-9)


def test_distances_unknown_reduction_lists_options():
    """An unknown head reduction is a ValueError naming the known ones."""
    s = SimilarityStats.zeros(2, 1)
    with pytest.raises(ValueError, match="mean, sum, max"):
        s.distances("median")


def test_boundary_ratio_is_mean_edge_mass_in_unit_interval():
    """boundary_ratio is the mean over heads and queries of the edge mass, within [0, 1]."""
    positions = list(range(5, 30))
    maps = causal_maps(3, 4, positions, 30, seed=7)
    s = SimilarityStats.zeros(3, 4)
    s.update(maps, torch.tensor(positions))
    br = s.boundary_ratio()
    want = direct_boundary(maps, positions, 0.1).sum(1) / (4 * len(positions))
    torch.testing.assert_close(br, want, atol=1e-6, rtol=1e-6)
    assert torch.all((br >= 0) & (br <= 1))
    assert torch.equal(SimilarityStats.zeros(3, 4).boundary_ratio(), torch.zeros(3, dtype=torch.float64))


def test_state_dict_round_trip():
    """state_dict / from_state_dict reproduce the sums exactly."""
    maps = causal_maps(3, 2, list(range(4, 12)), 12, seed=8)
    s = SimilarityStats.zeros(3, 2)
    s.update(maps, torch.arange(4, 12))
    r = SimilarityStats.from_state_dict(s.state_dict())
    assert (r.n_layers, r.n_heads, r.n_queries) == (3, 2, 8)
    assert torch.equal(r.sq_dist, s.sq_dist) and torch.equal(r.boundary, s.boundary)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    """On CUDA the sums stay on the device and match the CPU result."""
    positions = list(range(30, 64))
    maps = causal_maps(6, 4, positions, 64, seed=9)
    gpu = SimilarityStats.zeros(6, 4, device="cuda")
    gpu.update(maps.cuda(), torch.tensor(positions, device="cuda"))
    cpu = SimilarityStats.zeros(6, 4)
    cpu.update(maps, torch.tensor(positions))
    assert gpu.sq_dist.device.type == "cuda"
    torch.testing.assert_close(gpu.sq_dist.cpu(), cpu.sq_dist, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gpu.boundary.cpu(), cpu.boundary, atol=1e-6, rtol=1e-6)
    merged = cpu.merge(gpu)
    assert merged.device.type == "cpu" and merged.n_queries == 2 * len(positions)
