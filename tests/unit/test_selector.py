"""Tensor-only tests of compression plans and selection policies (krul.selector)."""
import pytest
import torch

from krul.selector import (
    SELECTORS, CompressionPlan, FixedPairsSelector, KrulSelector, MiniCacheSelector, SelectionInput,
    calibrate_fixed_pairs, greedy_pairs, make_selector, n_pairs_for_ratio, sensitive_layers,
)
from krul.similarity import SimilarityStats


def random_input(n_layers, seed, layer_bytes_per_token=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n_layers, n_layers, generator=g, dtype=torch.float64)
    d = x + x.T
    d.fill_diagonal_(0)
    br = torch.rand(n_layers, generator=g, dtype=torch.float64)
    return SelectionInput(d, br, n_layers, layer_bytes_per_token)


def check_plan(plan):
    used = [l for p in plan.pairs for l in p]
    assert len(used) == len(set(used)), plan.pairs
    assert all(a < b for a, b in plan.pairs)
    assert not set(used) & set(plan.sensitive)


def test_n_pairs_for_ratio():
    """n_pairs_for_ratio is the smallest k with L/(L-k) >= target, capped at L//2."""
    assert n_pairs_for_ratio(32, 1.0) == 0
    assert n_pairs_for_ratio(32, 1.5) == 11  # 32/21 = 1.52 >= 1.5 > 32/22
    assert n_pairs_for_ratio(32, 2.0) == 16
    assert n_pairs_for_ratio(32, 3.0) == 16
    assert n_pairs_for_ratio(24, 1.2) == 4  # 24/20 = 1.2 exactly
    for n in range(1, 40):
        for target in (1.1, 1.33, 1.5, 1.8):
            k = n_pairs_for_ratio(n, target)
            assert k == n // 2 or (n / (n - k) >= target - 1e-12 and (k == 0 or n / (n - k + 1) < target))


def test_sensitive_layers_below_tau():
    """Layers whose boundary mass is below tau are sensitive."""
    assert sensitive_layers(torch.tensor([0.1, 0.5, 0.29, 0.3, 0.9]), 0.3) == (0, 2)


def test_greedy_ascending_picks_closest_pair_first():
    """Ascending order takes the closest pair first, then the closest disjoint one, any two layers."""
    d = torch.full((6, 6), 10.0)
    d.fill_diagonal_(0)
    for (a, b), v in {(0, 5): 1.0, (0, 1): 2.0, (1, 4): 3.0, (2, 3): 4.0, (5, 4): 0.5}.items():
        d[a, b] = d[b, a] = v
    assert greedy_pairs(d, range(6), 3) == ((4, 5), (0, 1), (2, 3))
    assert greedy_pairs(d, range(6), 1) == ((4, 5),)
    assert greedy_pairs(d, [0, 1, 5], 3) == ((0, 5),)  # one pair left once 0 and 5 are used


def test_greedy_descending_picks_farthest_pair_first():
    """Descending order (KVSharer) takes the most dissimilar pair first."""
    d = torch.ones(5, 5)
    d.fill_diagonal_(0)
    d[1, 3] = d[3, 1] = 9.0
    d[0, 4] = d[4, 0] = 5.0
    assert greedy_pairs(d, range(5), 2, order="descending") == ((1, 3), (0, 4))


def test_greedy_ties_by_index():
    """Equal distances are broken by (a, b)."""
    d = torch.ones(4, 4)
    assert greedy_pairs(d, range(4), 2) == ((0, 1), (2, 3))


def test_krul_never_picks_sensitive_or_repeated_layers():
    """Krul plans avoid sensitive layers and use each layer at most once, on random inputs."""
    for seed in range(30):
        stats = random_input(16, seed)
        plan = KrulSelector(tau=0.3, target_ratio=1.5).select(stats)
        check_plan(plan)
        assert plan.sensitive == sensitive_layers(stats.boundary_ratio, 0.3)


def test_krul_meets_target_ratio():
    """With every layer allowed, the plan's nominal ratio reaches the target with the fewest pairs."""
    stats = random_input(32, 1)
    for target in (1.0, 1.2, 1.5, 2.0):
        plan = KrulSelector(tau=0.0, target_ratio=target).select(stats)
        assert plan.nominal_ratio >= target - 1e-12
        assert len(plan.pairs) == n_pairs_for_ratio(32, target)


def test_krul_meets_byte_budget():
    """A byte budget gives the smallest number of pairs whose stored bytes fit it."""
    lb = 1024.0
    stats = random_input(32, 2, layer_bytes_per_token=lb)
    for budget_layers in (32, 28.5, 24, 16):
        plan = KrulSelector(tau=0.0, budget_bytes_per_token=budget_layers * lb).select(stats)
        k = len(plan.pairs)
        assert (32 - k) * lb <= budget_layers * lb
        assert k == 0 or (32 - k + 1) * lb > budget_layers * lb
    extras = KrulSelector(tau=0.0, budget_bytes_per_token=24 * lb, pair_layer_equiv=1.2).select(stats)
    assert (32 - 2 * len(extras.pairs) + 1.2 * len(extras.pairs)) * lb <= 24 * lb
    with pytest.raises(ValueError, match="layer_bytes_per_token"):
        KrulSelector(budget_bytes_per_token=1.0).select(random_input(8, 0))


def test_krul_no_preempt_and_min_layer():
    """preempt=False protects nothing; layers below min_layer are never compressed."""
    stats = random_input(16, 3)
    plan = make_selector("krul-no-preempt", tau=0.99, target_ratio=2.0).select(stats)
    assert plan.sensitive == () and len(plan.pairs) == 8
    plan = KrulSelector(tau=0.0, target_ratio=2.0, min_layer=6).select(stats)
    check_plan(plan)
    assert min(l for p in plan.pairs for l in p) >= 6 and len(plan.pairs) == 5


def test_minicache_adjacent_deeper_half():
    """MiniCache pairs are adjacent, in the deeper half, deepest first, as many as the ratio needs."""
    plan = MiniCacheSelector(target_ratio=1.2).select(random_input(32, 0))
    assert plan.pairs == ((30, 31), (28, 29), (26, 27), (24, 25), (22, 23), (20, 21))
    full = MiniCacheSelector(target_ratio=2.0).select(random_input(32, 0))
    assert len(full.pairs) == 8 and full.pairs[-1] == (16, 17)
    assert all(b == a + 1 and a >= 16 for a, b in full.pairs)
    assert MiniCacheSelector.candidates(7) == ((5, 6), (3, 4))


def test_fixed_pairs_selector():
    """A fixed selector returns its pairs (the first n_pairs if set) for any input."""
    sel = FixedPairsSelector(pairs=[[4, 9], [1, 2], [5, 6]], n_pairs=2)
    plan = sel.select(random_input(12, 0))
    assert plan.pairs == ((4, 9), (1, 2)) and plan.n_layers == 12
    assert make_selector("kvsharer", pairs=((0, 3),)).select(random_input(4, 0)).method == "share"


def test_registry_errors_list_known_names():
    """Unknown selector names and parameters are ValueErrors listing the known ones."""
    with pytest.raises(ValueError, match="known: .*krul.*minicache"):
        make_selector("h2o")
    with pytest.raises(ValueError, match="no parameters \\['ratio'\\]"):
        make_selector("krul", ratio=2.0)
    assert isinstance(make_selector("krul", tau=0.2), KrulSelector)
    assert {"krul", "krul-fix", "kvsharer", "minicache", "none"} <= set(SELECTORS)


def test_plan_validation_and_round_trip():
    """Plans reject reused or misordered layers and survive to_dict/from_dict."""
    plan = CompressionPlan(((1, 4), (2, 3)), (0,), "share", 8)
    assert CompressionPlan.from_dict(plan.to_dict()) == plan
    assert plan.nominal_ratio == pytest.approx(8 / 6)
    assert plan.partner(4) == 1 and plan.partner(0) is None
    for bad in (((3, 1),), ((1, 2), (2, 3)), ((0, 9),)):
        with pytest.raises(ValueError):
            CompressionPlan(bad, (), "merge", 8)
    with pytest.raises(ValueError, match="sensitive"):
        CompressionPlan(((0, 1),), (1,), "merge", 8)


def test_calibrate_fixed_pairs_uses_the_average():
    """Calibration pairs by the distance averaged over conversations, dropping sensitive layers."""
    def inp(close_pair, br):
        d = torch.ones(4, 4, dtype=torch.float64)
        d.fill_diagonal_(0)
        a, b = close_pair
        d[a, b] = d[b, a] = 0.1
        return SelectionInput(d, torch.tensor(br, dtype=torch.float64), 4)

    convs = [inp((0, 1), [0.9] * 4), inp((0, 1), [0.9] * 4), inp((2, 3), [0.9, 0.0, 0.9, 0.9])]
    assert calibrate_fixed_pairs(convs, 1) == ((0, 1),)
    assert calibrate_fixed_pairs(convs, 1, tau=0.7) == ((2, 3),)  # layer 1 averages 0.6 < 0.7
    assert calibrate_fixed_pairs(convs, 1, order="descending")[0] in ((0, 2), (0, 3), (1, 2), (1, 3))


def test_selection_input_from_stats():
    """SelectionInput.from_stats carries the stats' distances and boundary ratios."""
    s = SimilarityStats.zeros(4, 2)
    s.sq_dist += torch.rand(4, 4, 2, dtype=torch.float64)
    s.sq_dist = s.sq_dist + s.sq_dist.transpose(0, 1)
    s.boundary += 3.0
    s.n_queries = 10
    inp = SelectionInput.from_stats(s, layer_bytes_per_token=64.0)
    assert torch.equal(inp.distances, s.distances())
    assert torch.allclose(inp.boundary_ratio, torch.full((4,), 0.3, dtype=torch.float64))
    check_plan(KrulSelector(tau=0.2).select(inp))


def test_matching_pairs_is_the_brute_force_least_total_distance():
    import itertools

    import torch

    from krul.selector import greedy_pairs, matching_pairs

    def best(d, layers, k, sign):
        top = None
        for combo in itertools.combinations(itertools.combinations(layers, 2), k):
            used = [l for p in combo for l in p]
            if len(set(used)) == len(used):
                cost = sum(sign * float(d[a, b]) for a, b in combo)
                top = cost if top is None else min(top, cost)
        return top

    g = torch.Generator().manual_seed(3)
    beaten = 0
    for trial in range(20):
        x = torch.rand(7, 7, generator=g, dtype=torch.float64) - 0.3  # negative scores too
        d = x + x.T
        layers = [0, 1, 2, 4, 5, 6] if trial % 2 else list(range(7))
        for k in (1, 2, 3):
            for order, sign in (("ascending", 1.0), ("descending", -1.0)):
                pairs = matching_pairs(d, layers, k, order)
                used = [l for p in pairs for l in p]
                assert len(pairs) == k and len(set(used)) == 2 * k and set(used) <= set(layers)
                total = sum(sign * float(d[a, b]) for a, b in pairs)
                assert total == pytest.approx(best(d, layers, k, sign))
                greedy = sum(sign * float(d[a, b]) for a, b in greedy_pairs(d, layers, k, order))
                assert total <= greedy + 1e-12
                beaten += total < greedy - 1e-12
    assert beaten > 0  # greedy is not optimal on these: the test can tell them apart


def test_matching_pairs_skips_nan_and_the_selector_uses_it():
    import torch

    from krul.selector import KrulSelector, SelectionInput, matching_pairs

    d = torch.full((4, 4), float("nan"), dtype=torch.float64)
    d[0, 1] = d[1, 0] = 1.0
    assert matching_pairs(d, range(4), 2) == ((0, 1),)  # (2, 3) has no score: never taken
    # greedy takes (1, 2) first and is left with (0, 3); matching takes (0, 1) + (2, 3)
    d = torch.tensor([[0, 2, 9, 5], [2, 0, 1, 9], [9, 1, 0, 2], [5, 9, 2, 0]], dtype=torch.float64)
    stats = SelectionInput(distances=d, boundary_ratio=torch.ones(4), n_layers=4)
    kw = dict(tau=0.0, target_ratio=2.0)
    assert set(KrulSelector(**kw).select(stats).pairs) == {(1, 2), (0, 3)}
    assert set(KrulSelector(**kw, pairing="matching").select(stats).pairs) == {(0, 1), (2, 3)}
    with pytest.raises(ValueError, match="pairing"):
        KrulSelector(**kw, pairing="random").select(stats)
