"""TTFT benchmark: rows, resume, plans mapped by depth, byte accounting (CPU, tiny random models)."""
import csv
import json

import pytest
import torch

from krul import bench, profile
from krul.store import build_state

REQUIRED = bench.COLUMNS[:bench.COLUMNS.index("repeats") + 1]


def _cfg(tmp_path, **kw):
    cfg = dict(shapes=["tiny-llama"], lengths=[24], tiers=["pageable", "disk"], new_tokens=4, repeats=1,
               warmup=1, device="cpu", out=str(tmp_path / "ttft.csv"), rates_grid=[8, 24],
               load_profile_bytes=1 << 20, bandwidth_bytes=8 << 20, log=lambda msg: None)
    cfg.update(kw)
    return cfg


@pytest.fixture(autouse=True)
def _fresh_rates_one_thread():
    """Rates measured per test; tiny models run single-threaded (shared CI cores spin otherwise)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    profile.clear_cache()
    yield
    profile.clear_cache()
    torch.set_num_threads(threads)


def test_smoke_rows_have_all_columns_and_resume(tmp_path):
    """A tiny run yields one row per policy and tier with every column, and a rerun skips them all."""
    rows = bench.run_ttft(_cfg(tmp_path))
    assert len(rows) == 2 * len(bench.DEFAULT_POLICIES)
    assert {r["policy"] for r in rows} == set(bench.DEFAULT_POLICIES)
    for row in rows:
        assert set(bench.COLUMNS) <= set(row), set(bench.COLUMNS) - set(row)
        assert all(row[c] not in (None, "") for c in REQUIRED)
        assert row["ttft_s_min"] <= row["ttft_s"] <= row["ttft_s_max"]
        assert row["bound_s"] > 0 and row["restore_over_bound"] > 0
        assert "random 4-layer" in row["note"]
    exact = [r for r in rows if r["policy"] in ("full-load", "full-recompute", "cake", "krul")]
    assert all(r["kv_max_abs_err"] < 1e-5 for r in exact)
    on_disk = bench.read_rows(tmp_path / "ttft.csv")
    assert len(on_disk) == len(rows) and set(on_disk[0]) == set(bench.COLUMNS)
    env = json.loads((tmp_path / "ttft.env.json").read_text())
    assert env["runs"][0]["torch"] == torch.__version__ and env["runs"][0]["rates"]
    lines = (tmp_path / "ttft.timeline.jsonl").read_text().splitlines()
    assert len(lines) == len(rows) and json.loads(lines[0])["columns"][0] == "stream"
    assert bench.run_ttft(_cfg(tmp_path)) == []  # resumed: nothing left to run
    assert len(json.loads((tmp_path / "ttft.env.json").read_text())["runs"]) == 2


def test_without_plan_krul_is_uncompressed_and_says_so(tmp_path):
    """No plan file: krul's compression ratio is 1 and plan_source says none."""
    rows = bench.run_ttft(_cfg(tmp_path, tiers=["pageable"], policies=["krul", "minicache"]))
    krul = [r for r in rows if r["policy"] == "krul"]
    assert len(krul) == 1 and krul[0]["compression_ratio"] == 1.0
    assert krul[0]["plan_source"].startswith("none")
    assert [r for r in rows if r["policy"] == "minicache"][0]["compression_ratio"] > 1.0


def test_plan_file_compresses_krul_and_minicache_matches_it(tmp_path):
    """A plan measured on a 30-layer model is mapped onto the 4-layer shape; minicache takes as many pairs."""
    plan_file = tmp_path / "plans.json"
    plan_file.write_text(json.dumps({"model": "smollm2-135m", "n_layers": 30, "plans": [
        {"conversation_id": "a", "pairs": [[20, 29]]},
        {"conversation_id": "b", "pairs": [[3, 4], [20, 29]]},
        {"conversation_id": "c", "pairs": [[10, 11]]}]}))
    rows = bench.run_ttft(_cfg(tmp_path, tiers=["pageable"], plan_file=str(plan_file),
                               policies=["krul", "krul-fixed-split", "minicache"]))
    krul = {r["plan_source"][:4]: r for r in rows if r["policy"] == "krul"}
    assert set(krul) == {"plan", "none"}
    assert krul["plan"]["compression_ratio"] > 1.0 and "mapped 30->4" in krul["plan"]["plan_source"]
    assert krul["none"]["compression_ratio"] == 1.0
    mini = [r for r in rows if r["policy"] == "minicache"][0]
    assert "1 pairs = krul's plan count" in mini["plan_source"]


def test_map_pairs_by_relative_depth():
    """Mapped pairs stay disjoint, in range, as many as before; same depth maps to itself."""
    pairs = ((0, 1), (10, 11), (20, 29), (27, 28))
    for n_dst in (8, 16, 24, 32):
        mapped = bench.map_pairs(pairs, 30, n_dst)
        flat = [l for p in mapped for l in p]
        assert len(mapped) == len(pairs) and len(set(flat)) == len(flat)
        assert all(0 <= a < b < n_dst for a, b in mapped)
    assert bench.map_pairs(pairs, 30, 30) == tuple(sorted(pairs))
    assert bench.map_pairs(((20, 29),), 30, 32) == ((21, 31),)
    assert len(bench.map_pairs(pairs, 30, 4)) == 2  # no more pairs than the layers allow


def test_plan_file_layouts_and_median_choice(tmp_path):
    """Lists, {"plans": ...} and {model: plans} layouts load; the median-size plan is chosen."""
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"smollm2-135m": [{"pairs": [[1, 2]], "id": "x"},
                                                 {"pairs": [[1, 2], [3, 4], [5, 6]], "id": "y"},
                                                 {"pairs": [[1, 2], [3, 4]], "id": "z"}],
                                "qwen2.5-coder-0.5b": {"plans": [{"pairs": [[0, 23]], "id": "q"}]}}))
    plans = bench.load_plan_file(path)
    assert {p.plan_id for p in plans} == {"x", "y", "z", "q"}
    assert {p.n_layers for p in plans} == {30, 24}
    chosen, why = bench.choose_plan(plans, "llama")
    assert chosen.plan_id == "z" and "3 plans" in why
    assert bench.choose_plan(plans, "qwen2")[0].plan_id == "q"
    path.write_text(json.dumps([{"pairs": [[0, 1]]}]))
    with pytest.raises(bench.PlanError, match="n_layers"):
        bench.load_plan_file(path)


def test_stored_bytes_per_token_matches_a_full_state():
    """The bound's bytes per token equals what a fully stored state of that plan holds, for every method."""
    adapter, _ = bench.build_adapter("tiny-llama", torch.device("cpu"))
    n = 200
    kv = [(torch.randn(1, 2, n, 16), torch.randn(1, 2, n, 16)) for _ in range(4)]
    from krul.selector import CompressionPlan

    for method, params in (("merge", {"retain_ratio": 0.05}), ("share", {}),
                           ("svd", {"rank_ratio": 0.47, "sink_tokens": 1, "retain_ratio": 0.03})):
        plan = CompressionPlan(((2, 3),), (), method, 4)
        state = build_state(adapter.fingerprint(), torch.arange(n), kv, [0] * 4, None, pairs=plan.pairs,
                            method=method, compress_kwargs=params)
        assert bench.stored_bytes_per_token(adapter, plan, params, n) == pytest.approx(state.kv_bytes() / n)
    assert bench.stored_bytes_per_token(adapter, None, {}, n) == 4 * adapter.layer_kv_bytes_per_token()


def test_svd_plan_file_rows_price_what_they_store(tmp_path):
    """A krul-svd-loss plan with its own parameters is stored as svd and priced at its real bytes; its
    uncompressed twin runs beside it, and the bound's b is the stored bytes per token."""
    plan_file = tmp_path / "plans.json"
    plan_file.write_text(json.dumps({"policies": [{
        "policy": "krul-svd-loss", "model": "smollm2-135m", "n_layers": 30, "method": "svd",
        "params": {"rank_ratio": 0.3, "sink_tokens": 1, "retain_ratio": 0.03},
        "plans": [{"conversation_id": "a", "pairs": [[20, 29]]}]}]}))
    rows = bench.run_ttft(_cfg(tmp_path, tiers=["pageable"], plan_file=str(plan_file), time_estimator=True,
                               policies=["full-load", "krul-svd-loss", "kvsharer"]))
    krul = {r["plan_source"][:4]: r for r in rows if r["policy"] == "krul-svd-loss"}
    assert set(krul) == {"plan", "none"}
    assert "svd" in krul["plan"]["plan_source"] and "rank_ratio=0.3" in krul["plan"]["plan_source"]
    assert krul["plan"]["compression_ratio"] > 1.0 and krul["none"]["compression_ratio"] == 1.0
    assert krul["plan"]["bound_bytes_per_token"] < krul["none"]["bound_bytes_per_token"]
    for r in rows:  # the bound is a bound: B the raw copy rate, P the best rate over the length grid
        assert r["tier_bytes_per_s"] == profile.raw_bandwidth("pageable", "cpu", nbytes=8 << 20)
        assert r["prefill_best_tokens_per_s"] >= r["prefill_tokens_per_s"]
        assert r["restore_over_bound"] >= 1.0 and r["predicted_restore_s"] > 0
    assert all(r["estimator_prefill_s"] > 0 and r["estimator_plain_eager_s"] > 0 for r in rows)
    kvsharer = [r for r in rows if r["policy"] == "kvsharer"][0]
    assert "1 pairs" in kvsharer["plan_source"]


def test_cli_runs_and_prints_json_last(tmp_path, capsys):
    """`python -m krul.bench ttft ...` runs a tiny sweep and ends with one JSON line."""
    code = bench.main(["ttft", "--shapes", "tiny-qwen2", "--lengths", "16", "--tiers", "disk",
                       "--policies", "full-load,krul", "--new-tokens", "4", "--repeats", "1",
                       "--warmup", "1", "--device", "cpu", "--rates-grid", "8,16", "--no-timeline",
                       "--bandwidth-mib", "8",
                       "--out", str(tmp_path / "o.csv")])
    assert code == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["rows"] == 2
    assert bench.main(["ttft", "--policies", "h2o", "--device", "cpu"]) == 2


def test_prefill_paths_are_separate_rows(tmp_path):
    """Each requested new-input path gets its own rows (and its own resume key)."""
    rows = bench.run_ttft(_cfg(tmp_path, tiers=["pageable"], policies=["full-load"],
                               prefill=["graph", "eager"]))
    assert sorted(r["prefill_path"] for r in rows) == ["eager", "graph"]
    assert all(r["prefill_mode"] == "eager (no CUDA)" for r in rows)
    assert bench.run_ttft(_cfg(tmp_path, tiers=["pageable"], policies=["full-load"], prefill="eager")) == []


def test_cpu_profile_swaps_timing_shapes_and_drops_pinned():
    """Without CUDA the 7B shapes become smollm2-135m and the pinned tier is dropped, with notes."""
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    cfg = bench.resolve_config({"profile": "full", "device": "auto", "shapes": ["llama-7b"],
                                "tiers": ["pinned", "disk"]})
    assert cfg["shapes"] == ["smollm2-135m"] and cfg["tiers"] == ["disk"]
    assert any("no CUDA" in n for n in cfg["notes"])


def test_rates_never_load_faster_than_the_raw_copy():
    """The fitted load bandwidth is clamped to the tier's raw large-copy rate (a faster slope is a fit artefact)."""
    adapter, _ = bench.build_adapter("tiny-llama", torch.device("cpu"))
    rates = profile.measure_rates(adapter, "pageable", (8, 24), load_bytes=1 << 20)
    assert 0 < rates.load_bytes_per_s <= profile.raw_bandwidth("pageable", "cpu", nbytes=8 << 20) * (1 + 1e-9)


def _variant(name="full-load", **kw):
    from krul.policies import POLICIES

    return dict(name=name, policy=POLICIES[name], plan=None, params={}, plan_source="n/a (no compression)", **kw)


def test_a_row_stamp_changes_with_settings_plan_file_device_and_code(tmp_path, monkeypatch):
    cfg = bench.resolve_config(_cfg(tmp_path))
    s = bench.bench_stamp(cfg, _variant(), "cpu:x")
    assert bench.bench_stamp(dict(cfg), _variant(), "cpu:x") == s
    assert bench.bench_stamp({**cfg, "lengths": [24, 48]}, _variant(), "cpu:x") == s  # not a row's setting
    assert bench.bench_stamp({**cfg, "repeats": 7}, _variant(), "cpu:x") != s
    assert bench.bench_stamp(cfg, _variant(), "cuda:H200") != s
    assert bench.bench_stamp(cfg, _variant("cake"), "cpu:x") != s
    plans = tmp_path / "plans.json"
    plans.write_text("[]")
    with_file = bench.bench_stamp({**cfg, "plan_file": str(plans)}, _variant(), "cpu:x")
    plans.write_text('{"policies": [], "provenance": {"time": "later"}}')  # the same name, other content
    other = bench.bench_stamp({**cfg, "plan_file": str(plans)}, _variant(), "cpu:x")
    assert other != with_file
    plans.write_text('{"policies": [], "provenance": {"time": "even later"}}')  # re-written, same plans
    assert bench.bench_stamp({**cfg, "plan_file": str(plans)}, _variant(), "cpu:x") == other
    monkeypatch.setattr("krul.evaluation.code_version", lambda: "edited")
    assert bench.bench_stamp(cfg, _variant(), "cpu:x").startswith("edited-")


def _row(policy, stamp=None):
    row = {"device": "cpu:x", "model": "m", "tier": "pageable", "history_tokens": 24, "new_input_tokens": 4,
           "policy": policy, "plan_source": "n/a", "prefill_path": "graph", "ttft_s": 1.0}
    return row if stamp is None else {**row, "stamp": stamp}


def test_settle_rows_keeps_same_stamp_moves_the_others_aside_once(tmp_path):
    out = tmp_path / "ttft.csv"
    for row in (_row("a", "sa"), _row("b", "old"), _row("c", "x"), _row("z", "other-grid")):
        bench.append_row(out, row)
    with open(tmp_path / "ttft.timeline.jsonl", "w") as f:
        for p in ("a", "b"):
            f.write(json.dumps({**_row(p), "events": []}) + "\n")
    key = lambda p: bench._row_key(_row(p))  # noqa: E731
    expected = {key("a"): "sa", key("b"): "sb", key("c"): "sc"}
    said = []
    kept, done = bench.settle_rows(out, expected, log=said.append)
    assert done == {key("a")} and [r["policy"] for r in kept] == ["a", "z"]  # z: not this run's grid
    assert [r["policy"] for r in bench.read_rows(out)] == ["a", "z"]
    assert [r["policy"] for r in bench.read_rows(tmp_path / "ttft.stale.csv")] == ["b", "c"]  # nothing deleted
    assert [json.loads(x)["policy"] for x in (tmp_path / "ttft.timeline.jsonl").read_text().splitlines()] == ["a"]
    assert json.loads((tmp_path / "ttft.stale.timeline.jsonl").read_text())["policy"] == "b"
    assert len(said) == 1 and said[0].startswith("2 rows were made by other code/settings: recomputing them")
    said.clear()
    bench.settle_rows(out, expected, log=said.append)
    assert said == []  # said once: the rest of the file is this run's


def test_rows_from_before_stamps_are_recomputed_unless_adopted(tmp_path):
    out = tmp_path / "ttft.csv"
    with open(out, "w", newline="") as f:  # an older file: no stamp column
        w = csv.DictWriter(f, fieldnames=[c for c in bench.COLUMNS if c != "stamp"], extrasaction="ignore")
        w.writeheader()
        w.writerow(_row("a"))
    expected = {bench._row_key(_row("a")): "sa"}
    said = []
    kept, done = bench.settle_rows(out, expected, adopt_unstamped=True, log=said.append)
    assert done == set(expected) and len(kept) == 1 and "adopting 1 unstamped rows" in said[0]
    assert "stamp" in bench.read_rows(out)[0]  # the header now has the column; the row is kept as is
    said.clear()
    kept, done = bench.settle_rows(out, expected, log=said.append)
    assert done == set() and kept == [] and "carry no stamp" in said[0]
    assert len(bench.read_rows(tmp_path / "ttft.stale.csv")) == 1


def test_a_rerun_under_other_settings_recomputes_its_rows(tmp_path):
    said = []
    cfg = _cfg(tmp_path, tiers=["pageable"], policies=["full-load"], log=said.append)
    first = bench.run_ttft(cfg)
    assert len(first) == 1 and first[0]["stamp"]
    assert bench.run_ttft(cfg) == []
    again = bench.run_ttft({**cfg, "repeats": 2})
    assert len(again) == 1 and again[0]["stamp"] != first[0]["stamp"]
    assert sum("were made by other code/settings" in m for m in said) == 1
    assert len(bench.read_rows(tmp_path / "ttft.csv")) == 1 and len(bench.read_rows(tmp_path / "ttft.stale.csv")) == 1


def test_loader_issue_reaches_the_restore_and_the_price(tmp_path, monkeypatch):
    """--loader-issue thread: every timed restore is called with issue="thread", the scheduler prices
    it without the loads' issue cost in the recomputed layers, and the setting is in the row stamp;
    an unknown mode is a BenchError naming the known ones."""
    from dataclasses import replace

    seen = []
    real = bench.restore_into

    def spy(*args, **kwargs):
        seen.append(kwargs.get("issue"))
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "restore_into", spy)
    rows = bench.run_ttft(_cfg(tmp_path, tiers=["pageable"], policies=["cake"], loader_issue="thread"))
    assert rows and seen and set(seen) == {"thread"}
    rates = replace(profile.measure_rates(bench.build_adapter("tiny-llama", torch.device("cpu"))[0], "pageable",
                                          (8, 24), load_bytes=1 << 20), load_issue_lookahead=2.0)
    assert bench.issue_rates(rates, "thread").load_issue_lookahead == 0.0
    assert bench.issue_rates(rates, "interleaved") is rates
    cfg = bench.resolve_config(_cfg(tmp_path))
    assert bench.bench_stamp(cfg, _variant(), "cpu:x") != \
        bench.bench_stamp(bench.resolve_config(_cfg(tmp_path, loader_issue="thread")), _variant(), "cpu:x")
    with pytest.raises(bench.BenchError, match="interleaved, thread"):
        bench.resolve_config(_cfg(tmp_path, loader_issue="eager"))
