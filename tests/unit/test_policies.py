"""The policy registry's svd entries: byte predictions and the rank-ratio knob stay consistent."""
import pytest

from krul.policies import POLICIES, PolicyError, get_policy, load_bytes_per_token, with_rank_ratio
from krul.selector import CompressionPlan, n_pairs_for_ratio, pair_ratio


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


def test_load_bytes_per_token_for_svd_pairs():
    plan = CompressionPlan(((0, 1),), (), "svd", 4)
    per = load_bytes_per_token(plan, 4, 100.0, rank_ratio=0.5)
    assert per == [50.0, 50.0, 100.0, 100.0]


@pytest.mark.parametrize("equiv", [1.0, 1.25, 1.5])
def test_n_pairs_for_ratio_inverts_pair_ratio(equiv):
    for k in range(0, 16):
        assert n_pairs_for_ratio(30, pair_ratio(30, k, equiv), equiv) == k


def test_with_rank_ratio_on_a_fixed_plan_builds_its_selector():
    from krul.selector import make_selector

    p = with_rank_ratio(get_policy("krul-fix-svd"), 0.6)
    assert p.compress_params["rank_ratio"] == 0.6
    make_selector(p.selector, **p.selector_params)  # no pair_layer_equiv for a fixed plan
