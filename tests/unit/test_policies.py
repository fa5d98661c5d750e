"""The policy registry's svd entries: byte predictions and the rank-ratio knob stay consistent."""
import pytest

from krul.policies import POLICIES, PolicyError, get_policy, with_rank_ratio
from krul.selector import n_pairs_for_ratio, pair_ratio


def test_svd_policies_are_registered_with_their_pair_size():
    for name in ("krul-svd", "krul-fix-svd"):
        p = POLICIES[name]
        assert p.selector_params["method"] == "svd" and 0 < p.compress_params["rank_ratio"] <= 1
    krul_svd = POLICIES["krul-svd"]
    assert krul_svd.needs_estimator
    c = krul_svd.compress_params
    assert krul_svd.selector_params["pair_layer_equiv"] == pytest.approx(2 * (c["rank_ratio"] + c["retain_ratio"]))


def test_with_rank_ratio_moves_both_knobs_and_refuses_other_methods():
    p = with_rank_ratio(get_policy("krul-svd").with_params(compress_params={"retain_ratio": 0.0}), 0.75)
    assert p.compress_params["rank_ratio"] == 0.75 and p.selector_params["pair_layer_equiv"] == 1.5
    with pytest.raises(PolicyError, match="svd"):
        with_rank_ratio(get_policy("krul"), 0.5)


def test_with_rank_alloc_sets_or_drops_the_option_and_refuses_what_does_not_apply():
    from krul.policies import with_rank_alloc

    p = with_rank_alloc(get_policy("krul-fix-svd"), "pairs")
    assert p.compress_params["rank_alloc"] == "pairs"
    assert p.selector_params == get_policy("krul-fix-svd").selector_params  # same bytes: same plan
    assert "rank_alloc" not in with_rank_alloc(p, "uniform").compress_params
    with pytest.raises(PolicyError, match="svd"):
        with_rank_alloc(get_policy("krul"), "pairs")
    with pytest.raises(PolicyError, match="rank_alloc"):
        with_rank_alloc(get_policy("krul-svd"), "per-layer")


@pytest.mark.parametrize("equiv", [1.0, 1.25, 1.5])
def test_n_pairs_for_ratio_inverts_pair_ratio(equiv):
    for k in range(0, 16):
        assert n_pairs_for_ratio(30, pair_ratio(30, k, equiv), equiv) == k


def test_with_rank_ratio_on_a_fixed_plan_builds_its_selector():
    from krul.selector import make_selector

    p = with_rank_ratio(get_policy("krul-fix-svd"), 0.6)
    assert p.compress_params["rank_ratio"] == 0.6
    make_selector(p.selector, **p.selector_params)  # no pair_layer_equiv for a fixed plan


class _Adapter:
    n_layers = 6
    head_dim = 4

    @staticmethod
    def layer_kv_bytes_per_token():
        return 64


class _Engine:
    """What RestorePolicy.plan reads of an engine: stats (none: tau 0) and recorded losses."""

    adapter = _Adapter()

    def __init__(self, losses=None):
        self.losses = losses

    def similarity_stats(self, conversation_id):
        return None

    def recorded_losses(self, conversation_id):
        return self.losses


def _svd_loss_policy(n_pairs=2):
    from krul.calibrate import grid_policy

    return grid_policy("krul-svd-loss", 0.0, n_pairs, 6).with_params(needs_estimator=False)


def test_svd_loss_policy_pairs_the_lowest_loss_layers():
    import torch

    losses = torch.full((6, 6), 0.5, dtype=torch.float64)
    for a, b, x in ((0, 5, 0.01), (2, 3, 0.02), (0, 2, 0.005), (1, 4, 0.3)):
        losses[a, b] = losses[b, a] = x
    plan = _svd_loss_policy().plan(_Engine(losses), "c", 6)
    # greedy by ascending loss, each layer once: (0, 2) first, then (0, 5) and (2, 3) are blocked
    assert plan.pairs == ((0, 2), (1, 4)) and plan.method == "svd"


def test_svd_loss_policy_scores_the_segment_it_is_given():
    import torch

    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 1, 40, 4, generator=g)
    noise = lambda: 0.01 * torch.randn(1, 1, 40, 4, generator=g)
    # layers 1 and 4 carry the same KV (a pair svd stores at no loss); the others are unrelated
    segment = [(torch.randn(1, 1, 40, 4, generator=g), torch.randn(1, 1, 40, 4, generator=g)) for _ in range(6)]
    segment[1] = (base, base.flip(-1))
    segment[4] = (base + noise(), base.flip(-1) + noise())
    plan = _svd_loss_policy(1).plan(_Engine(), "c", 6, segment, 0)
    assert plan.pairs == ((1, 4),)


def test_svd_loss_policy_refuses_what_it_cannot_score():
    with pytest.raises(PolicyError, match="segment"):
        _svd_loss_policy().plan(_Engine(), "c", 6)
    merge = _svd_loss_policy().with_params(selector_params={**_svd_loss_policy().selector_params, "method": "merge"})
    with pytest.raises(PolicyError, match="merge"):
        merge.plan(_Engine(), "c", 6)
    with pytest.raises(PolicyError, match="pair_score"):
        _svd_loss_policy().with_params(pair_score="cosine").plan(_Engine(), "c", 6)


def test_weighted_svd_loss_is_the_first_order_nll_cost_of_both_layers():
    import torch

    from krul.compression import svd_pair_losses

    g = torch.Generator().manual_seed(1)
    segment = [(torch.randn(1, 1, 30, 4, generator=g) * (l + 1), torch.randn(1, 1, 30, 4, generator=g))
               for l in range(6)]
    weights = (0.5, 2.0, 1.0, 0.1, 3.0, 1.5)
    policy = _svd_loss_policy().with_params(layer_weights=weights)
    cost = policy.score_segment(segment)
    own = svd_pair_losses(segment, **{**policy.loss_kwargs(segment), "reduce": "none"})
    for a in range(6):
        for b in range(6):
            if a != b:
                assert float(cost[a, b]) == pytest.approx(weights[a] * float(own[a, b]) + weights[b] * float(own[b, a]))
    assert torch.isnan(cost.diagonal()).all()
    with pytest.raises(PolicyError, match="layer weights"):
        policy.with_params(layer_weights=weights[:4]).score_segment(segment)


def test_svd_loss_policies_read_their_own_dev_record(tmp_path, monkeypatch):
    import json

    from krul import paths

    (tmp_path / "calibration").mkdir()
    rec = {"split": "dev", "tau": 0.0, "target_ratio": 1.25, "n_pairs": 2, "krul_fix_pairs": [[6, 7], [4, 5]],
           "krul_fix_loss_pairs": [[1, 3], [0, 5]], "layer_sensitivity": [0.5] * 6}
    (tmp_path / "calibration" / "m.svd-loss.json").write_text(json.dumps(rec))
    monkeypatch.setattr(paths, "experiments_dir", lambda: tmp_path)
    krul = get_policy("krul-svd-loss", model="m")
    assert krul.layer_weights == (0.5,) * 6 and krul.selector_params["target_ratio"] == 1.25
    assert get_policy("krul-fix-svd-loss", model="m").selector_params["pairs"] == ((1, 3), (0, 5))
    # the paper's family reads <model>.json, which does not exist here: registry defaults
    assert get_policy("krul-fix-svd", model="m").selector_params["pairs"] == ()
    assert get_policy("krul-svd", model="m").layer_weights is None


def _scores(pairs_low, n=6, low=0.01, high=0.5):
    import torch

    m = torch.full((n, n), high, dtype=torch.float64)
    for i, (a, b) in enumerate(pairs_low):
        m[a, b] = m[b, a] = low * (i + 1)
    m.fill_diagonal_(float("nan"))
    return m


def test_prior_weight_moves_the_plan_from_the_conversation_to_the_dev_mean():
    from krul.selector import SelectionInput, calibrate_fixed_pairs
    import torch

    own = _scores([(0, 1), (2, 3)])
    prior = _scores([(0, 5), (1, 4)])
    base = _svd_loss_policy().with_params(pair_prior=tuple(map(tuple, prior.tolist())))
    assert base.plan(_Engine(own), "c", 6).pairs == ((0, 1), (2, 3))  # prior_weight 0: its own scores
    fixed = calibrate_fixed_pairs([SelectionInput(prior, torch.ones(6), 6)], 2, order="ascending", tau=0.0)
    # prior_weight 1 is the dev plan (krul-fix-svd-loss's greedy over the same mean)
    assert base.with_params(prior_weight=1.0).plan(_Engine(own), "c", 6).pairs == tuple(map(tuple, fixed))
    blended = base.with_params(prior_weight=0.25).with_prior(own)
    assert torch.allclose(blended, 0.75 * own + 0.25 * prior, equal_nan=True)


def test_prior_weight_refuses_a_missing_or_misshapen_prior():
    own = _scores([(0, 1)])
    with pytest.raises(PolicyError, match="no dev mean"):
        _svd_loss_policy().with_params(prior_weight=0.5).plan(_Engine(own), "c", 6)
    small = tuple(map(tuple, _scores([(0, 1)], n=4).tolist()))
    with pytest.raises(PolicyError, match="shape"):
        _svd_loss_policy().with_params(prior_weight=0.5, pair_prior=small).plan(_Engine(own), "c", 6)
    with pytest.raises(PolicyError, match=r"\[0, 1\]"):
        _svd_loss_policy().with_params(prior_weight=1.5).with_prior(own)


def test_dev_record_fills_the_prior_and_its_weight():
    import json
    import math

    from krul.calibrate import matrix_json
    from krul.policies import with_dev_scores

    m = _scores([(0, 1)])
    rec = json.loads(json.dumps({"layer_sensitivity": [1.0] * 6, "mean_pair_loss": matrix_json(m),
                                 "prior_weight": 0.3}))  # NaN diagonal travels as null
    p = with_dev_scores(get_policy("krul-svd-loss"), rec)
    assert p.prior_weight == 0.3 and p.layer_weights == (1.0,) * 6
    assert math.isnan(p.pair_prior[2][2]) and p.pair_prior[0][1] == pytest.approx(0.01)
    assert with_dev_scores(get_policy("krul-svd-loss"), rec, prior_weight=0.0).prior_weight == 0.0
    assert with_dev_scores(get_policy("krul-svd-loss"), {}).prior_weight == 0.0


def test_a_record_that_chose_matching_pairs_both_svd_loss_policies_by_it(tmp_path, monkeypatch):
    import json

    import torch

    from krul import paths
    from krul.calibrate import matrix_json
    from krul.selector import matching_pairs

    x = torch.rand(6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    prior = x + x.T
    prior.fill_diagonal_(float("nan"))
    (tmp_path / "calibration").mkdir()
    rec = {"split": "dev", "tau": 0.0, "target_ratio": 1.25, "n_pairs": 2, "krul_fix_loss_pairs": [[1, 3], [0, 5]],
           "layer_sensitivity": [0.5] * 6, "mean_pair_loss": matrix_json(prior), "pairing": "matching"}
    (tmp_path / "calibration" / "m.svd-loss.json").write_text(json.dumps(rec))
    monkeypatch.setattr(paths, "experiments_dir", lambda: tmp_path)
    assert get_policy("krul-svd-loss", model="m").selector_params["pairing"] == "matching"
    fixed = get_policy("krul-fix-svd-loss", model="m").selector_params["pairs"]
    assert set(fixed) == set(matching_pairs(prior, range(6), 2))


def test_krul_family_schedulers_may_choose_steeper_pyramids():
    """Every krul-family policy that schedules has candidate slopes beyond its own; cake does not."""
    for name, p in POLICIES.items():
        if name.startswith("krul") and p.split == "scheduler":
            assert p.extra_slopes and all(s > p.slope for s in p.extra_slopes), name
    assert POLICIES["cake"].extra_slopes == ()
