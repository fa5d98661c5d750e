"""Tests of the restoration cost model and the bubble-free split (krul.scheduler); numbers only."""
import math
import random

import numpy as np
import pytest

from krul.scheduler import (
    RestoreRates, RestoreSplit, bound_recompute_ratio, bound_s, cake_split, choose_split, fixed_split,
    issue_schedule, predict, pyramid_lengths, pyramid_lengths_grid,
)

# Synthetic rate settings: (rates, per-layer bytes per loaded token) for L = 8 layers.
L = 8
FULL = [2048.0] * L
COMPRESSED = [2048.0] * 4 + [1100.0] * 4  # two merged pairs in the deeper half: ~0.54 per layer
SETTINGS = {
    "linear-balanced": (RestoreRates(recompute_s_per_token=1e-6, load_bytes_per_s=1e9), FULL),
    "quadratic+fixed": (RestoreRates(recompute_s_per_token=5e-7, recompute_s_per_token_sq=2e-9,
                                     recompute_s_per_layer=2e-5, recompute_s_fixed=1e-4,
                                     load_bytes_per_s=2e9, load_s_per_layer=1e-5, load_s_fixed=5e-5),
                        COMPRESSED),
    "fast-load": (RestoreRates(recompute_s_per_token=4e-6, load_bytes_per_s=5e10), COMPRESSED),
    "slow-load": (RestoreRates(recompute_s_per_token=2e-7, load_bytes_per_s=3e8,
                               load_s_per_layer=1e-4), FULL),
}


def objective(lengths, n_tokens, rates, b):
    t_rec, t_load = predict(RestoreSplit(lengths, n_tokens), rates, b)
    return max(t_rec, t_load)


@pytest.mark.parametrize("n_tokens", [0, 1, 7, 100, 1000])
@pytest.mark.parametrize("slope", [0.0, 0.5, 1.0, 1.5])
def test_pyramid_shape(n_tokens, slope):
    """Pyramid lengths are non-increasing, within [0, N], and sum to round(r N L)."""
    for r in np.linspace(0, 1, 41):
        lengths = pyramid_lengths(n_tokens, L, float(r), slope)
        assert len(lengths) == L
        assert all(0 <= x <= n_tokens for x in lengths)
        assert all(a >= b for a, b in zip(lengths, lengths[1:]))
        assert sum(lengths) == round(r * n_tokens * L)
        if n_tokens:
            assert abs(RestoreSplit(lengths, n_tokens).recompute_ratio - r) <= 0.5 / (n_tokens * L)


@pytest.mark.parametrize("n_tokens,n_layers", [(0, 8), (1, 8), (7, 3), (997, 30), (4000, 32), (5, 1), (9, 0)])
@pytest.mark.parametrize("slope", [0.0, 1.0, 4.0, 64.0])
def test_pyramid_grid_rows_equal_single_ratios(n_tokens, n_layers, slope):
    """Each row of the batched grid is the split of its ratio alone, whatever else is in the batch
    (endpoints, repeats and ratios that need the largest-remainder pass or none)."""
    rng = random.Random(n_tokens * 31 + n_layers)
    ratios = [0.0, 1.0, 0.5, 0.5, 1e-9, 1 - 1e-9] + [rng.random() for _ in range(60)]
    rng.shuffle(ratios)
    grid = pyramid_lengths_grid(n_tokens, n_layers, ratios, slope)
    assert grid.shape == (len(ratios), n_layers) and grid.dtype == np.int64
    for r, row in zip(ratios, grid):
        single = pyramid_lengths(n_tokens, n_layers, r, slope)
        assert tuple(row.tolist()) == single, r
        assert sum(single) == round(r * n_tokens * n_layers)
        assert all(a >= b for a, b in zip(single, single[1:]))
    with pytest.raises(ValueError, match="recompute_ratio"):
        pyramid_lengths_grid(10, 4, [0.2, 1.5])


def test_pyramid_endpoints_and_slopes():
    """r=0 loads everything, r=1 recomputes everything, slope 0 is flat, slope 1 is linear 2Nr..0."""
    assert pyramid_lengths(500, 6, 0.0) == (0,) * 6
    assert pyramid_lengths(500, 6, 1.0) == (500,) * 6
    flat = pyramid_lengths(1000, 6, 0.3, slope=0.0)
    assert max(flat) - min(flat) <= 1
    pyr = pyramid_lengths(1100, 12, 0.25, slope=1.0)  # unclipped: 2*N*r*(1 - l/(L-1))
    want = [2 * 1100 * 0.25 * (1 - l / 11) for l in range(12)]
    assert all(abs(x - w) <= 1 for x, w in zip(pyr, want))
    clipped = pyramid_lengths(1000, 8, 0.8, slope=1.0)  # shallow layers saturate, mass moves deeper
    assert clipped[0] == 1000 and sum(clipped) == 6400


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("slope", [0.0, 1.0])
def test_choose_split_equals_brute_force(setting, slope):
    """The chosen split attains the brute-force min of max(T_rec, T_load) over every total length."""
    rates, b = SETTINGS[setting]
    n_tokens = 60
    best = min((objective(pyramid_lengths(n_tokens, L, t / (n_tokens * L), slope), n_tokens, rates, b), t)
               for t in range(n_tokens * L + 1))
    split = choose_split(n_tokens, L, rates, b, slope=slope, n_grid=21)
    got = objective(split.lengths, n_tokens, rates, b)
    assert got == pytest.approx(best[0], rel=1e-12, abs=0)
    assert sum(split.lengths) == best[1]  # ties go to the smaller ratio
    assert split.t_restore_s == pytest.approx(got, rel=1e-12)


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_choose_split_never_worse_than_grid(setting):
    """On a realistic size the split is at least as good as the brute-force grid argmin."""
    rates, b = SETTINGS[setting]
    n_tokens, n_grid = 3000, 201
    grid = min(objective(pyramid_lengths(n_tokens, L, i / (n_grid - 1), 1.0), n_tokens, rates, b)
               for i in range(n_grid))
    split = choose_split(n_tokens, L, rates, b, slope=1.0, n_grid=n_grid)
    assert objective(split.lengths, n_tokens, rates, b) <= grid


def test_choose_split_balances_streams():
    """With linear rates the two stream times meet to within one token's worth of work."""
    rates, b = SETTINGS["linear-balanced"]
    split = choose_split(4000, L, rates, b, slope=1.0)
    per_token = max(rates.recompute_s_per_token, 2048 / rates.load_bytes_per_s)
    assert abs(split.t_recompute_s - split.t_load_s) <= per_token * 1.01
    assert 0 < split.recompute_ratio < 1


def test_streams_monotone_in_ratio():
    """With per-token costs, T_rec is non-decreasing and T_load non-increasing in r (bisection's premise)."""
    rates = RestoreRates(recompute_s_per_token=1e-6, load_bytes_per_s=1e9)
    for slope in (0.0, 0.5, 1.0):
        times = [predict(RestoreSplit(pyramid_lengths(50, L, t / (50 * L), slope), 50), rates, FULL)
                 for t in range(50 * L + 1)]
        rec, load = zip(*times)
        assert all(x <= y + 1e-15 for x, y in zip(rec, rec[1:]))
        assert all(x >= y - 1e-15 for x, y in zip(load, load[1:]))


def test_choose_split_random_rates_brute_force():
    """On random rates (per-layer and fixed terms make rounding wiggle the streams) the split is optimal."""
    rng = random.Random(0)
    for _ in range(40):
        n_layers, n_tokens = rng.choice([2, 3, 5, 8]), rng.choice([1, 5, 20, 40])
        rates = RestoreRates(
            recompute_s_per_token=10 ** rng.uniform(-7, -5),
            recompute_s_per_token_sq=rng.choice([0.0, 10 ** rng.uniform(-10, -8)]),
            recompute_s_per_layer=rng.choice([0.0, 10 ** rng.uniform(-6, -4)]),
            recompute_s_fixed=rng.choice([0.0, 10 ** rng.uniform(-5, -3)]),
            load_bytes_per_s=10 ** rng.uniform(8, 11),
            load_s_per_layer=rng.choice([0.0, 10 ** rng.uniform(-6, -4)]),
            load_s_fixed=rng.choice([0.0, 1e-4]))
        b = [rng.choice([2048.0, 1100.0, 512.0]) for _ in range(n_layers)]
        slope = rng.choice([0.0, 0.5, 1.0, 1.5])
        total = n_tokens * n_layers
        best = min(objective(pyramid_lengths(n_tokens, n_layers, t / total, slope), n_tokens, rates, b)
                   for t in range(total + 1))
        split = choose_split(n_tokens, n_layers, rates, b, slope=slope, n_grid=rng.choice([5, 21, 201]))
        assert objective(split.lengths, n_tokens, rates, b) <= best * (1 + 1e-12)


def test_compression_shifts_split_towards_loading():
    """Smaller stored bytes (compressed layers) lower the chosen recompute ratio."""
    rates = RestoreRates(recompute_s_per_token=1e-6, load_bytes_per_s=1e9)
    full = choose_split(2000, L, rates, FULL)
    compressed = choose_split(2000, L, rates, COMPRESSED)
    assert compressed.recompute_ratio < full.recompute_ratio
    assert compressed.t_restore_s < full.t_restore_s


def test_extreme_bandwidths():
    """Infinite bandwidth loads everything (r = 0); zero bandwidth recomputes everything (r = 1)."""
    fast = choose_split(1000, L, RestoreRates(1e-6, load_bytes_per_s=math.inf), FULL)
    assert fast.recompute_ratio == 0.0 and fast.t_restore_s == 0.0
    dead = choose_split(1000, L, RestoreRates(1e-6, load_bytes_per_s=0.0), FULL)
    assert dead.recompute_ratio == 1.0 and dead.t_load_s == 0.0


def test_predict_hand_computed():
    """predict adds per-token, quadratic, per-layer and fixed terms of each stream."""
    rates = RestoreRates(recompute_s_per_token=1.0, recompute_s_per_token_sq=0.1, recompute_s_per_layer=10.0,
                         recompute_s_fixed=100.0, load_bytes_per_s=2.0, load_s_per_layer=1000.0,
                         load_s_fixed=10000.0)
    split = RestoreSplit((3, 2, 0), n_tokens=4)
    t_rec, t_load = predict(split, rates, [2.0, 4.0, 1.0])
    assert t_rec == pytest.approx(100 + 2 * 10 + 5 * 1.0 + 0.1 * (9 + 4))
    assert t_load == pytest.approx(10000 + 3 * 1000 + (1 * 2 + 2 * 4 + 4 * 1) / 2.0)
    assert predict(RestoreSplit((0, 0, 0), 4), rates, [1, 1, 1])[0] == 0.0
    assert predict(RestoreSplit((4, 4, 4), 4), rates, [1, 1, 1])[1] == 0.0


def test_fixed_and_cake_splits():
    """fixed_split is flat at its ratio; cake_split is choose_split with slope 0."""
    f = fixed_split(1000, L, 0.4)
    assert f.recompute_ratio == pytest.approx(0.4) and max(f.lengths) - min(f.lengths) <= 1
    rates, b = SETTINGS["linear-balanced"]
    assert cake_split(1000, L, rates, 2048.0).lengths == choose_split(1000, L, rates, b, slope=0.0).lengths


def test_bound_closed_form_equals_brute_force():
    """bound_s equals the minimum over a dense r grid of max(r N / P, (1 - r) N b / B)."""
    for n, p, b, bw in ((2000, 3.2e4, 1.3e5, 5.5e10), (4000, 5e3, 5e5, 1e10), (500, 1e4, 1e6, 1e9)):
        r = np.linspace(0, 1, 200001)
        brute = np.maximum(r * n / p, (1 - r) * n * b / bw).min()
        assert bound_s(n, p, b, bw) == pytest.approx(brute, rel=1e-4)
        r_star = bound_recompute_ratio(n, p, b, bw)
        assert r_star * n / p == pytest.approx((1 - r_star) * n * b / bw)
    assert bound_s(1000, 1e4, 1e5, math.inf) == 0.0
    assert bound_s(1000, 1e4, 1e5, 0.0) == pytest.approx(0.1)


def test_rates_and_split_round_trip_and_validation():
    """RestoreRates/RestoreSplit survive to_dict/from_dict; bad lengths are rejected."""
    rates = SETTINGS["quadratic+fixed"][0]
    assert RestoreRates.from_dict(rates.to_dict()) == rates
    split = RestoreSplit((5, 3, 3), 5, 1.0, 2.0)
    assert RestoreSplit.from_dict(split.to_dict()) == split
    with pytest.raises(ValueError, match="non-increasing"):
        RestoreSplit((1, 2), 5)
    with pytest.raises(ValueError, match="lie in"):
        RestoreSplit((6, 2), 5)
    with pytest.raises(ValueError, match="one entry per layer"):
        predict(split, rates, [1.0, 2.0])


def test_min_gain_keeps_a_single_stream_when_overlap_promises_little():
    """Loading is 50x faster than recompute: the balanced split saves ~2%, so min_gain 0.1 loads all;
    with equal speeds the split halves the time and is kept."""
    fast_load = RestoreRates(recompute_s_per_token=1e-4, load_bytes_per_s=2048 * 50 / 1e-4)
    plain = choose_split(1000, L, fast_load, FULL, slope=1.0)
    assert plain.recompute_ratio > 0  # the argmin does overlap a little
    kept = choose_split(1000, L, fast_load, FULL, slope=1.0, min_gain=0.1)
    assert kept.recompute_ratio == 0 and kept.t_recompute_s == 0
    rates, b = SETTINGS["linear-balanced"]
    balanced = choose_split(4000, L, rates, b, slope=1.0, min_gain=0.1)
    assert balanced.lengths == choose_split(4000, L, rates, b, slope=1.0).lengths
    assert 0 < balanced.recompute_ratio < 1
    with pytest.raises(ValueError, match="min_gain"):
        choose_split(10, L, rates, b, min_gain=1.0)


# -- the max form, issue coupling and priced bytes -------------------------------------------------
OLD_RATES_DICT = {  # as measured and recorded before the host terms existed (H200, 37ed210, pinned)
    "recompute_s_per_token": 1.9868962008099441e-07, "recompute_s_per_token_sq": 1.5072826230570894e-10,
    "recompute_s_per_layer": 0.0007024374355630796, "recompute_s_fixed": 0.0,
    "load_bytes_per_s": 77814970155.6486, "load_s_per_layer": 0.00011458758794859776, "load_s_fixed": 0.0}
HOST = RestoreRates(recompute_s_per_token=1e-6, recompute_s_per_layer=1e-4, recompute_s_fixed=1e-3,
                    load_bytes_per_s=5e10, load_s_per_layer=1e-5, load_s_fixed=5e-4,
                    recompute_host_s_per_layer=6e-4, recompute_host_s_per_job=2e-4, load_issue_lookahead=2)


def test_old_rates_dicts_load_and_keep_the_sum_form():
    """A dict recorded before the host terms loads with them at 0 and predicts the old linear sum;
    the new fields survive a round trip."""
    old = RestoreRates.from_dict(OLD_RATES_DICT)
    assert (old.recompute_host_s_per_layer, old.recompute_host_s_per_job, old.load_issue_lookahead) == (0, 0, 0)
    split = RestoreSplit(pyramid_lengths(4000, 32, 0.14, 1.0), 4000)
    rec = np.asarray(split.lengths, dtype=float)
    on = rec > 0
    t_rec, t_load = predict(split, old, 16384.0)
    assert t_rec == pytest.approx(old.recompute_s_per_layer * on.sum() + old.recompute_s_per_token * rec.sum()
                                  + old.recompute_s_per_token_sq * (rec ** 2).sum(), rel=1e-12)
    loaded = (4000 - rec) * 16384.0
    assert t_load == pytest.approx(old.load_s_per_layer * (loaded > 0).sum() + loaded.sum() / old.load_bytes_per_s,
                                   rel=1e-12)
    assert RestoreRates.from_dict(HOST.to_dict()) == HOST
    assert RestoreRates.from_dict({k: str(v) for k, v in HOST.to_dict().items()}) == HOST


def test_layer_time_is_max_of_host_and_device():
    """A layer costs max(host + jobs * issue, device): the host floor at short prefixes, the device
    at long ones, and the jobs it issues raise only its host side."""
    assert HOST.layer_times([0])[0] == 0
    assert HOST.layer_times([10])[0] == pytest.approx(6e-4)            # device 1.1e-4
    assert HOST.layer_times([10], [2])[0] == pytest.approx(1e-3)       # host 6e-4 + 2 * 2e-4
    assert HOST.layer_times([5000])[0] == pytest.approx(1e-4 + 5e-3)   # device-bound
    assert HOST.layer_times([5000], [2])[0] == pytest.approx(1e-4 + 5e-3)


def test_issue_schedule_mirrors_restores_direct_loader():
    """k jobs before the first recomputed layer, then max(k, ceil(pending / layers left)) at each."""
    first, at = issue_schedule([100] * 32, 32, 2)
    assert first == 2 and list(at) == [2] * 15 + [0] * 17
    first, at = issue_schedule([50, 40, 0, 0], 4, 2)
    assert first == 2 and list(at) == [2, 0, 0, 0]
    first, at = issue_schedule([50, 40, 30, 0], 20, 2)
    assert first == 2 and list(at) == [6, 6, 6, 0]
    assert issue_schedule([0, 0], 5, 2)[1].sum() == 0
    assert issue_schedule([9, 9], 1, 2) == (1, pytest.approx(np.zeros(2)))


def test_coupled_loads_wait_for_the_host():
    """Jobs issued from the recompute thread start no earlier than issued: one recomputed token at
    layer 0 issues the other 6 jobs at that layer's start, one per issue cost, so the last copy
    starts only after the recompute's fixed cost and 6 issue costs."""
    L8 = 8
    split = RestoreSplit((1,) + (0,) * (L8 - 1), 1000)
    t_rec, t_load = predict(split, HOST, 2048.0)
    assert t_rec == pytest.approx(1e-3 + 6e-4 + 6 * 2e-4)  # fixed + host floor + 6 issued jobs
    free = RestoreRates(**{**HOST.to_dict(), "load_issue_lookahead": 0})
    _, t_free = predict(split, free, 2048.0)
    per_job = 1e-5 + 1000 * 2048 / 5e10
    assert t_free == pytest.approx(5e-4 + 8 * per_job - 2048 / 5e10)  # all issued at once
    # the 8th job is ready at the recompute's fixed cost + 6 issue costs (each copy is shorter than an
    # issue cost, so the copy stream waits for each job) and copies after that
    assert t_load == pytest.approx(5e-4 + 1e-3 + 6 * 2e-4 + per_job)


def _toy_bytes(n_tokens):
    """An svd-like pricing: each layer pays a fixed basis plus bytes that grow like sqrt(tokens)."""
    def load_bytes(lengths):
        assert lengths.dtype == np.int64 and lengths.shape == (L,)
        loaded = n_tokens - lengths
        return np.where(loaded > 0, 5e4 + 3e3 * np.sqrt(loaded) * 64, 0.0)
    return load_bytes


def test_callable_bytes_are_accepted_everywhere():
    """predict, choose_split and cake_split take a callable (lengths) -> per-layer bytes; a linear
    callable reproduces the per-token array exactly; a non-linear one is optimised by brute force."""
    rates, b = SETTINGS["quadratic+fixed"]
    n = 60
    linear = lambda lengths: (n - lengths) * np.asarray(b)  # noqa: E731
    for slope in (0.0, 1.0):
        assert choose_split(n, L, rates, linear, slope=slope, n_grid=21) == choose_split(n, L, rates, b, slope=slope,
                                                                                       n_grid=21)
    split = RestoreSplit(pyramid_lengths(n, L, 0.3, 1.0), n)
    assert predict(split, rates, linear) == predict(split, rates, b)
    assert cake_split(n, L, rates, linear, n_grid=21) == cake_split(n, L, rates, b, n_grid=21)
    toy = _toy_bytes(n)
    best = min((objective(pyramid_lengths(n, L, t / (n * L), 1.0), n, rates, toy), t) for t in range(n * L + 1))
    got = choose_split(n, L, rates, toy, slope=1.0, n_grid=21)
    assert objective(got.lengths, n, rates, toy) == pytest.approx(best[0], rel=1e-9)
    assert cake_split(n, L, rates, toy, n_grid=21, min_gain=0.5).lengths in ((0,) * L, (n,) * L)


def test_callable_bytes_are_checked():
    """A pricing callable must return one finite non-negative number per layer."""
    rates, _ = SETTINGS["linear-balanced"]
    split = RestoreSplit((3,) * L, 5)
    with pytest.raises(ValueError, match="one entry per layer"):
        predict(split, rates, lambda lengths: np.ones(L - 1))
    with pytest.raises(ValueError, match="finite bytes >= 0"):
        predict(split, rates, lambda lengths: -np.ones(L))
    with pytest.raises(ValueError, match="finite bytes >= 0"):
        choose_split(5, L, rates, lambda lengths: np.full(L, np.nan))


def test_host_floor_moves_the_split_towards_loading():
    """With a host floor per layer and issue costs, short histories load everything even where the
    sum form would overlap; long ones still split."""
    sum_form = RestoreRates(**{**HOST.to_dict(), "recompute_host_s_per_layer": 0.0, "recompute_host_s_per_job": 0.0,
                               "load_issue_lookahead": 0})
    b = 16384.0
    assert choose_split(1000, 32, sum_form, b, min_gain=0.1).recompute_ratio > 0
    assert choose_split(1000, 32, HOST, b, min_gain=0.1).lengths == (0,) * 32
    assert choose_split(8000, 32, HOST, b, min_gain=0.1).recompute_ratio > 0


def test_candidate_slopes_pick_a_steep_pyramid_under_a_host_floor():
    """With a GPU-like host-issue floor per recomputed layer, a steep pyramid (few layers, long
    prefixes) is predicted faster than the paper's slope 1, and choose_split takes it; the best of
    several slopes is never predicted slower than any one of them."""
    from krul.scheduler import RestoreRates, choose_split

    gpu = RestoreRates(recompute_s_per_token=7e-7, recompute_s_per_layer=2.4e-4, load_bytes_per_s=55e9,
                       load_s_per_layer=1.3e-4, recompute_host_s_per_layer=1.1e-3)
    cpu = RestoreRates(recompute_s_per_token=3e-6, load_bytes_per_s=5e9)
    for rates in (gpu, cpu):
        for n in (500, 2000, 4000, 8000):
            singles = [choose_split(n, 32, rates, 524288 / 32, slope=s, min_gain=0.1) for s in (1.0, 4.0, 16.0, 64.0)]
            both = choose_split(n, 32, rates, 524288 / 32, slope=(1.0, 4.0, 16.0, 64.0), min_gain=0.1)
            assert both.t_restore_s <= min(s.t_restore_s for s in singles) + 1e-12
    steep = choose_split(4000, 32, gpu, 524288 / 32, slope=(1.0, 64.0), min_gain=0.1)
    linear = choose_split(4000, 32, gpu, 524288 / 32, slope=1.0, min_gain=0.1)
    assert steep.t_restore_s < 0.95 * linear.t_restore_s
    assert sum(1 for x in steep.lengths if x) < 16  # a few layers recompute, the rest load
