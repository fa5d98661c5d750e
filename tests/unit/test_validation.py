"""Plan validation's pieces (krul.validation, RestorePolicy.dev_plan): tensor-only."""
import pytest
import torch

from krul import validation
from krul.policies import PolicyError, get_policy
from krul.selector import CompressionPlan


def test_window_is_at_most_half_the_segment_and_leaves_a_prefix():
    assert validation.window(1000, 400, 128) == 128
    assert validation.window(1000, 100, 128) == 50
    assert validation.window(3, 3, 128) == 1
    assert validation.window(1, 1, 128) == 0
    assert validation.window(1000, 400, 0) == 0
    with pytest.raises(ValueError, match="validate_tokens"):
        validation.window(10, 10, -1)


def test_kl_divergence_is_zero_for_equal_and_positive_for_different_predictions():
    g = torch.Generator().manual_seed(0)
    p = torch.log_softmax(torch.randn(5, 11, generator=g), -1)
    q = torch.log_softmax(torch.randn(5, 11, generator=g), -1)
    assert validation.kl_divergence(p, p) == pytest.approx(0.0, abs=1e-7)
    kl = validation.kl_divergence(p, q)
    brute = sum(float((p[i].exp() * (p[i] - q[i])).sum()) for i in range(5)) / 5
    assert kl > 0 and kl == pytest.approx(brute, rel=1e-5)
    with pytest.raises(ValueError, match="shapes"):
        validation.kl_divergence(p, q[:4])


def _policy(dev_pairs):
    return get_policy("krul-svd-loss").with_params(validate_tokens=16, dev_pairs=dev_pairs)


def test_dev_plan_takes_as_many_dev_pairs_as_the_own_plan_avoiding_protected_layers():
    own = CompressionPlan(((0, 5), (1, 2)), (3,), "svd", 8)
    dev = _policy(((2, 3), (4, 6), (0, 1), (5, 7))).dev_plan(own)
    assert dev.pairs == ((4, 6), (0, 1)) and dev.sensitive == (3,) and dev.method == "svd"


def test_dev_plan_is_none_when_it_cannot_differ_or_cannot_be_filled():
    own = CompressionPlan(((0, 1), (2, 3)), (), "svd", 8)
    assert _policy(((2, 3), (0, 1), (4, 5))).dev_plan(own) is None  # the same pairs
    assert _policy(((0, 1),)).dev_plan(own) is None  # too few
    assert _policy(None).dev_plan(own) is None
    with pytest.raises(PolicyError, match="dev pairs"):
        _policy(None).validated(None, [1, 2, 3], [], None, own, None)
    assert _policy(((4, 5),)).dev_plan(CompressionPlan((), (), "svd", 8)) is None  # nothing compressed
