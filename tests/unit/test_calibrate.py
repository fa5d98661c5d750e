"""The curve policies compress exactly the pairs the curve point names, at recompute ratio 0."""
import pytest

from krul.calibrate import (BUDGET_POLICIES, CODEC_ONLY_POLICIES, CODEC_PAIR_POLICIES, CURVE_POLICIES, StorageMeter, _compress_for,
                            curve_policy, point_pair_counts)

CAL = {"split": "dev", "tau": 0.0, "krul_fix_pairs": [[6, 7], [4, 5], [3, 8]],
       "kvsharer_pairs": [[11, 24], [10, 25], [1, 18]], "krul_fix_loss_pairs": [[0, 24], [1, 23], [16, 17]]}


@pytest.mark.parametrize("name", [n for n in CURVE_POLICIES
                                  if n not in CODEC_ONLY_POLICIES + CODEC_PAIR_POLICIES + BUDGET_POLICIES])
def test_curve_policy_loads_everything_and_targets_k_pairs(name):
    policy = curve_policy(name, 2, 30, CAL, tau=0.25)
    assert policy.name == name
    assert policy.split in ("load", "fixed") and policy.recompute_ratio == 0.0
    params = policy.selector_params
    if name == "krul":
        assert params["tau"] == 0.25 and params["target_ratio"] == pytest.approx(30 / 28)
    elif name == "minicache":
        assert params["target_ratio"] == pytest.approx(30 / 28)
    elif name == "krul-fix":
        assert params["pairs"] == ((6, 7), (4, 5)) and params["method"] == "merge"
    elif name in ("krul-svd", "krul-svd-loss"):  # a pair stores 2 * (rank_ratio + retain_ratio) layers
        assert params["tau"] == 0.25 and params["method"] == "svd"
        assert policy.pair_score == ("svd-loss" if name == "krul-svd-loss" else "attention")
        assert params["target_ratio"] == pytest.approx(30 / (30 - 2 * (2 - params["pair_layer_equiv"])))
    elif name == "krul-fix-svd":
        assert params["pairs"] == ((6, 7), (4, 5)) and params["method"] == "svd"
    elif name == "krul-fix-svd-loss":
        assert params["pairs"] == ((0, 24), (1, 23)) and params["method"] == "svd"
    else:
        assert params["pairs"] == ((11, 24), (10, 25)) and params["method"] == "share"


def test_curve_policy_refuses_more_pairs_than_calibrated():
    with pytest.raises(ValueError, match="fewer than 4"):
        curve_policy("krul-fix", 4, 30, CAL, tau=0.0)
    with pytest.raises(ValueError, match="no curve"):
        curve_policy("full-load", 1, 30, CAL, tau=0.0)
    no_loss = {k: v for k, v in CAL.items() if k != "krul_fix_loss_pairs"}
    with pytest.raises(ValueError, match="krul_fix_loss_pairs"):
        curve_policy("krul-fix-svd-loss", 1, 30, no_loss, tau=0.0)


def test_curve_table_marks_points_within_tolerance():
    from krul.calibrate import curve_table

    rec = {"points": [
        {"policy": "krul", "n_pairs": 1, "compression_ratio": 1.03, "nll_ratio": 1.004, "nll_ratio_lo": 1.0,
         "nll_ratio_hi": 1.009},
        {"policy": "minicache", "n_pairs": 1, "compression_ratio": 1.03, "nll_ratio": 1.05,
         "nll_ratio_lo": 1.02, "nll_ratio_hi": 1.08}]}
    table = curve_table(rec).splitlines()
    assert len(table) == 3
    assert "1.030x, 1.004 [1.000, 1.009] (within 1%)" in table[2]
    assert "1.050 [1.020, 1.080] |" in table[2]


def test_svd_curve_policy_follows_the_rank_ratio():
    policy = curve_policy("krul-svd", 4, 30, {**CAL, "rank_ratio": 0.75}, tau=0.0)
    assert policy.compress_params["rank_ratio"] == 0.75
    retain = policy.compress_params["retain_ratio"]
    assert policy.selector_params["pair_layer_equiv"] == pytest.approx(2 * (0.75 + retain))
    # 4 pairs that each store 2 * (0.75 + retain) layers
    assert policy.selector_params["target_ratio"] == pytest.approx(30 / (30 - 4 * (0.5 - 2 * retain)))
    from krul.selector import SelectionInput, make_selector
    import torch

    sel = make_selector("krul", **policy.selector_params)
    stats = SelectionInput(distances=torch.rand(30, 30), boundary_ratio=torch.ones(30), n_layers=30)
    assert len(sel.select(stats).pairs) == 4


def test_curve_points_record_the_prior_weight_they_ran_with():
    from krul.calibrate import _prior_for

    assert _prior_for("krul-svd-loss", None, CAL) == 0.0  # what the older points ran with
    assert _prior_for("krul-svd-loss", None, {**CAL, "prior_weight": 0.5}) == 0.5
    assert _prior_for("krul-svd-loss", 0.25, {**CAL, "prior_weight": 0.5}) == 0.25
    assert _prior_for("krul-fix-svd-loss", 0.25, CAL) is None and _prior_for("krul", 0.25, CAL) is None
    assert curve_policy("krul-svd-loss", 2, 30, CAL, tau=0.0, prior_weight=0.25).prior_weight == 0.25


def test_svd_loss_curves_pair_by_the_pairing_asked_for():
    import torch

    from krul.calibrate import _pairing_for, matrix_json
    from krul.selector import matching_pairs

    g = torch.Generator().manual_seed(5)
    x = torch.rand(30, 30, generator=g, dtype=torch.float64)
    prior = x + x.T
    prior.fill_diagonal_(float("nan"))
    cal = {**CAL, "mean_pair_loss": matrix_json(prior), "mean_boundary_ratio": [1.0] * 30}
    own = curve_policy("krul-svd-loss", 3, 30, cal, tau=0.0, pairing="matching")
    assert own.selector_params["pairing"] == "matching"
    fix = curve_policy("krul-fix-svd-loss", 3, 30, cal, tau=0.0, pairing="matching")
    assert set(fix.selector_params["pairs"]) == set(matching_pairs(prior, range(30), 3))
    # greedy (the default, and what points without a "pairing" ran with) keeps the record's list
    assert curve_policy("krul-fix-svd-loss", 2, 30, cal, tau=0.0).selector_params["pairs"] == ((0, 24), (1, 23))
    assert _pairing_for("krul-svd-loss", None, cal) == "greedy" and _pairing_for("krul", "matching", cal) is None
    assert _pairing_for("krul-svd-loss", None, {**cal, "pairing": "matching"}) == "matching"
    with pytest.raises(ValueError, match="mean_pair_loss"):
        curve_policy("krul-fix-svd-loss", 2, 30, CAL, tau=0.0, pairing="matching")


@pytest.mark.parametrize("name", CODEC_ONLY_POLICIES)
def test_codec_only_curve_policies_have_one_point_and_their_codec(name):
    assert point_pair_counts(name, (8, 12)) == (0,)
    policy = curve_policy(name, 0, 30, CAL, tau=0.0)
    assert policy.name == name and policy.selector is None and policy.recompute_ratio == 0.0
    assert policy.compress_params["codec"]["bits"] in (2, 4, 8)
    wider = curve_policy(name, 0, 30, CAL, tau=0.0, codec_group=128)
    assert wider.compress_params["codec"]["group"] == 128
    assert {k: v for k, v in wider.compress_params["codec"].items() if k != "group"} == \
        {k: v for k, v in policy.compress_params["codec"].items() if k != "group"}
    # the resume key follows the group: a point measured at another group size is not reused
    assert _compress_for(name, None, CAL, codec_group=128) == dict(wider.compress_params)
    assert _compress_for(name, None, CAL) != _compress_for(name, None, CAL, codec_group=128)


@pytest.mark.parametrize("name", CODEC_PAIR_POLICIES)
def test_quantized_krul_curve_policies_are_krul_svd_loss_plus_their_codec(name):
    assert point_pair_counts(name, (8, 12)) == (8, 12)
    inner = curve_policy("krul-svd-loss", 4, 30, CAL, tau=0.0)
    policy = curve_policy(name, 4, 30, CAL, tau=0.0)
    assert policy.name == name
    assert policy.selector_params == inner.selector_params and policy.pair_score == inner.pair_score
    codec = policy.compress_params["codec"]
    assert codec["bits"] == int(name.rsplit("int", 1)[1])
    assert {k: v for k, v in policy.compress_params.items() if k != "codec"} == dict(inner.compress_params)
    assert _compress_for(name, None, CAL) == dict(policy.compress_params)


def test_storage_meter_counts_restored_states_at_two_bytes_per_element():
    import torch

    from krul.pricing import storage_ratio
    from krul.quant import codec_fn
    from krul.store import ExactLayer, StoredItem, StoredState, make_store

    n, layers = 40, 3
    items = [StoredItem((l,), 0, n, ExactLayer(torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8)))
             for l in range(layers)]
    state = StoredState({"kv_heads": 2, "head_dim": 8}, torch.arange(n), (0,) * layers, items, {})
    meter = StorageMeter(make_store("pageable"))
    assert meter.ratio is None
    meter.put("a", state)
    assert "a" in meter
    assert meter.get("a") is not None and meter.ratio == pytest.approx(1.0)  # fp32 here, bf16 counted
    quantized = state.map_payloads(codec_fn({"bits": 8, "group": 8}))
    meter.put("b", quantized)
    meter.get("b")
    assert meter.stored > meter.full / 2  # the exact state plus the int8 one
    assert storage_ratio(quantized) == pytest.approx(2 / (1 + 2 * 2 / 8))  # codes + bf16 scale and zero


def _pt(name, ratio, nll, lo=None, hi=None, k=0):
    return {"policy": name, "storage_ratio": ratio, "nll_ratio": nll, "nll_ratio_lo": lo or nll - 0.001,
            "nll_ratio_hi": hi or nll + 0.001, "n_pairs": k}


def test_interpolation_is_linear_in_log_storage_ratio_and_stays_in_the_measured_range():
    import math

    from krul.calibrate import interpolate

    curve = [_pt("int8", 2.0, 1.0), _pt("int4", 8.0, 1.02)]
    mid = interpolate(curve, 4.0)  # halfway in log
    assert mid["nll_ratio"] == pytest.approx(1.01) and mid["nll_ratio_hi"] == pytest.approx(1.011)
    assert interpolate(curve, 2.0)["nll_ratio"] == pytest.approx(1.0)
    assert interpolate(curve, 1.5) is None and interpolate(curve, 9.0) is None
    assert interpolate(curve, math.sqrt(2.0 * 8.0))["nll_ratio"] == pytest.approx(1.01)


def test_codec_comparison_says_which_side_wins_either_way():
    from krul.calibrate import codec_comparison, largest_within

    quant_wins = [_pt("int8", 2.0, 1.0), _pt("int4", 4.0, 1.004), _pt("krul-svd-loss-int8", 3.0, 1.008, k=8)]
    table = codec_comparison(quant_wins, ("krul-svd-loss-int8",), ("int8", "int4"))
    row = next(l for l in table.splitlines() if l.startswith("| krul-svd-loss-int8"))
    assert row.endswith("| quantization alone |")
    krul_wins = [_pt("int8", 2.0, 1.0), _pt("int4", 4.0, 1.02), _pt("krul-svd-loss-int8", 3.0, 1.002, k=8)]
    table = codec_comparison(krul_wins, ("krul-svd-loss-int8",), ("int8", "int4"))
    row = next(l for l in table.splitlines() if l.startswith("| krul-svd-loss-int8"))
    assert row.endswith("| krul-svd-loss-int8 |")
    assert largest_within([_pt("a", 2.0, 1.0), _pt("a", 3.0, 1.0095, hi=1.0101)]) == 2.0
    assert largest_within([_pt("a", 2.0, 1.02)]) is None


def test_quantization_alone_is_the_best_codec_at_each_size():
    """The quantization-only side is the lower envelope of its codecs (`envelope_at`): a codec that
    stores less than another only at a far worse nll (kivi 2.55x at 1.14 behind int4 3.41x at 1.006)
    cannot make quantization look worse than its best codecs at those bytes, and a codec beaten at
    noise level (qwen: int8 1.8x at 1.0000, int4 3.4x at 0.9998) still anchors the curve below int4."""
    from krul.calibrate import codec_comparison, envelope_at

    points = [_pt("int8", 1.8, 1.0002), _pt("kivi", 2.55, 1.14), _pt("int4", 3.4, 1.0064),
              _pt("krul-svd-loss-int8", 2.47, 1.002, k=8)]
    at = envelope_at(points[:3], 2.47)["nll_ratio"]
    assert 1.0002 < at < 1.0064  # between int8 and int4, not pulled up by kivi
    assert envelope_at(points[:3], 2.55)["nll_ratio"] < 1.14 and envelope_at(points[:3], 1.7) is None
    assert envelope_at(points[:3], 3.4)["nll_ratio"] == pytest.approx(1.0064)
    row = next(l for l in codec_comparison(points, ("krul-svd-loss-int8",), ("int8", "int4", "kivi")).splitlines()
               if l.startswith("| krul-svd-loss-int8"))
    assert float(row.split("|")[5].split()[0]) == pytest.approx(at, abs=1e-4)
    qwen = [_pt("int8", 1.807, 1.0000), _pt("int4", 3.414, 0.9998), _pt("krul-svd-loss-int8", 2.41, 0.9991, k=6)]
    row = next(l for l in codec_comparison(qwen, ("krul-svd-loss-int8",), ("int8", "int4")).splitlines()
               if l.startswith("| krul-svd-loss-int8"))
    assert 0.9998 <= float(row.split("|")[5].split()[0]) <= 1.0  # measured: int8 does not drop out
    assert row.endswith("| krul-svd-loss-int8 (intervals overlap) |")  # 0.9991 +- 0.001 against ~0.9999


def test_h2o_curve_points_sit_at_their_target_storage_ratios():
    from krul.calibrate import point_key

    assert point_pair_counts("h2o", (8, 12), budget_ratios=(2, 4)) == (2.0, 4.0)
    policy = curve_policy("h2o", 4.0, 30, CAL, tau=0.0)
    assert policy.name == "h2o" and policy.budget_ratio == pytest.approx(0.25) and policy.recompute_ratio == 0.0
    assert point_key({"policy": "h2o", "n_pairs": 0, "target_storage_ratio": 4.0}) == ("h2o", 4.0)
    assert point_key({"policy": "int8", "n_pairs": 0}) == ("int8", 0)


def _convs(text="hello"):
    from krul.data import Conversation

    return [Conversation("c1", [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}], "test")]


CURVE_GRID = [("krul", 1), ("krul-fix", 2), ("minicache", 1), ("h2o", 2.0)]


def _stamps(cal=CAL, tau=0.25, convs=None, **kw):
    from krul.calibrate import curve_stamps

    return curve_stamps(CURVE_GRID, "m", "test", 30, cal, tau, convs or _convs(), 2000, 3, **kw)


def test_curve_stamps_follow_settings_calibration_content_conversations_and_code(monkeypatch):
    a = _stamps()
    assert a == _stamps() and len(set(a.values())) == len(CURVE_GRID)
    # the same record written again (another time, another run) is the same calibration
    assert _stamps({**CAL, "runtime_s": 9.0, "provenance": {"git_sha": "x"}}) == a
    edited = _stamps({**CAL, "krul_fix_pairs": [[6, 7], [3, 8], [4, 5]]})  # another dev plan
    assert all(edited[p] != a[p] for p in CURVE_GRID)
    assert _stamps(tau=0.3)[("krul", 1)] != a[("krul", 1)]
    other = _stamps(convs=_convs("hello!"))  # same id, other content
    assert all(other[p] != a[p] for p in CURVE_GRID)
    monkeypatch.setattr("krul.evaluation.code_version", lambda: "edited")
    assert all(s.startswith("edited-") for s in _stamps().values())
    # a point the calibration cannot resolve gets a stamp too (it fails with its message when it runs)
    from krul.calibrate import curve_stamps

    assert curve_stamps([("krul-fix", 4)], "m", "test", 30, CAL, 0.0, _convs(), 2000, 3)


def test_curve_points_resume_by_stamp_and_adopt_unstamped_ones_only_when_asked(tmp_path):
    import json

    from krul.calibrate import point_key, resume_points

    expected = _stamps()
    partial, record = tmp_path / "m.curves-test.partial.jsonl", tmp_path / "m.curves-test.json"
    record.write_text(json.dumps({"points": [], "provenance": {"git_sha": "abc123"}}))
    lines = [{"policy": "krul", "n_pairs": 1, "stamp": expected[("krul", 1)]},
             {"policy": "krul-fix", "n_pairs": 2, "stamp": "older-code"},
             {"policy": "minicache", "n_pairs": 1, "tau": 0.25},  # made before stamps
             {"policy": "h2o", "n_pairs": 0, "target_storage_ratio": 2.0, "tau": 0.5}]  # before, other tau
    partial.write_text("".join(json.dumps(g) + "\n" for g in lines))
    said = []
    same = lambda g: g.get("tau") == 0.25  # noqa: E731 - the older field checks
    done = resume_points(partial, expected, point_key, same, record=record, log=said.append).done
    assert set(done) == {("krul", 1)}
    assert said == [f"1 points were made by other code/settings: recomputing them (see {partial})",
                    f"1 points in {partial} carry no stamp (made before stamps, by unknown code): "
                    "recomputing them; --adopt-unstamped resumes them"]
    said.clear()
    done = resume_points(partial, expected, point_key, same, adopt_unstamped=True, record=record,
                         log=said.append).done
    assert set(done) == {("krul", 1), ("minicache", 1)}  # h2o's older point ran at another tau
    assert said[-1] == (f"adopting 1 unstamped points from {partial} (made before stamps; their record's "
                        "provenance: git abc123)")


def test_a_calibration_grid_key_rounds_tau():
    from krul.calibrate import grid_key

    assert grid_key(0.1 + 1e-12, 2, None) == grid_key(0.1, 2, None) == (0.1, 2, None)
