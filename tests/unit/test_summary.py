"""`python -m krul.experiments summary [--run DIR]` (issue 22): the committed reference runs judged by
their figures' claims, and a user's own run folder beside its figure's reference."""
import shutil

import pytest

from krul import experiments, paths

REF = paths.results_dir() / "fig3_storage" / "reference" / "cpu-default"


def _run_folder(tmp_path, profile="default"):
    """A run folder as `python -m krul.experiments run fig3_storage --out DIR` writes it, from the
    committed reference's files, with krul storing half as much again (a different number)."""
    import pandas as pd

    run = tmp_path / "my-run"
    run.mkdir()
    for f in ("config.yaml", "env.json"):
        shutil.copy(REF / f, run / f)
    df = pd.read_csv(REF / "data.csv")
    krul = df.policy == "krul"
    for full, stored in (("full_kv_bytes", "stored_bytes"), ("full_storage_bytes", "storage_bytes")):
        if stored in df:  # priced bytes when the reference has them, else the in-memory bytes
            df.loc[krul, stored] = df.loc[krul, full] // 2
    df["storage_ratio"] = df.full_kv_bytes / df.stored_bytes
    df.to_csv(run / "data.csv", index=False)
    if profile != "default":
        text = (run / "config.yaml").read_text()
        (run / "config.yaml").write_text(text.replace("profile: default", f"profile: {profile}"))
    return run


def _row(out, prefix):
    rows = [line for line in out.splitlines() if line.startswith(f"| {prefix}")]
    assert len(rows) == 1, (prefix, out)
    return [c.strip() for c in rows[0].strip("|").split("|")]


def _reference():
    """The committed reference's own claim value and provenance, so that the tests follow a
    re-recorded reference instead of pinning its numbers."""
    import json

    import pandas as pd

    env = json.loads((REF / "env.json").read_text())
    df = pd.read_csv(REF / "data.csv")
    d = df[df.policy == "krul"]
    d = d[d.history_tokens == d.history_tokens.max()]
    full, stored = ("full_storage_bytes", "storage_bytes") if "storage_bytes" in d else ("full_kv_bytes", "stored_bytes")
    return d[full].sum() / d[stored].sum(), env["git_sha"][:10], env["device"]


def test_summary_lists_every_figure_with_its_reference_verdicts(capsys):
    assert experiments.main(["summary"]) == 0
    out = capsys.readouterr().out
    for slug in experiments.slugs():
        assert f"## {slug}" in out
    ratio, ref_sha, ref_device = _reference()
    assert ratio >= 1.33 + 0.05  # the committed reference holds the claim, so its verdict must say so
    run, metric, value, predicate, verdict, sha, device = _row(out, "reference cpu-default | storage_ratio")
    assert (metric, value, predicate, verdict) == ("storage_ratio_at_longest", f"{ratio:.3f}", ">= 1.33 +- 0.05", "holds")
    assert sha == ref_sha and device == ref_device == "cpu"
    assert "NVIDIA H200" in out  # the GPU references' provenance, from the bench runs they hold


def test_a_run_is_judged_beside_its_reference(tmp_path, capsys):
    run = _run_folder(tmp_path)
    assert experiments.main(["summary", "--run", str(run)]) == 0
    out = capsys.readouterr().out
    assert "## fig3_storage" in out and "## fig2_ttft" not in out  # only the run's figure
    ratio = _reference()[0]
    ref = _row(out, "reference cpu-default")
    mine = _row(out, f"your run {run}")
    assert ref[2:5] == [f"{ratio:.3f}", ">= 1.33 +- 0.05", "holds"]
    assert mine[1:5] == ["storage_ratio_at_longest", "2.000", ">= 1.33 +- 0.05", "holds"]
    # the per-policy numbers side by side: one column per run, krul's differs, the others do not
    header = _row(out, "policy |")
    assert "reference cpu-default" in header[1] and f"your run {run}" in header[2]
    krul = _row(out, "krul |")
    assert krul[1] == f"{ratio:.4g}" and krul[2] == "2"
    assert _row(out, "minicache |")[1] == _row(out, "minicache |")[2]


def test_a_smoke_run_is_not_judged(tmp_path, capsys):
    run = _run_folder(tmp_path, profile="smoke")
    assert experiments.main(["summary", "--run", str(run)]) == 0
    assert _row(capsys.readouterr().out, f"your run {run}")[4] == "smoke run: not a measurement"


def _not_a_run(d, case):
    if case == "missing":
        return d / "missing"
    if case == "interrupted":
        (d / "partial").mkdir()
        return d
    (d / "data.csv").write_text("a\n1\n")
    if case == "unknown figure":
        (d / "config.yaml").write_text("slug: nope\n")
    return d


@pytest.mark.parametrize("case, says", [
    ("missing", "no such folder"),
    ("interrupted", "not a run folder, it has no data.csv and no config.yaml (the run may have stopped"),
    ("no config", "not a run folder, it has no config.yaml"),
    ("unknown figure", "names no known figure"),
])
def test_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path, capsys, case, says):
    folder = _not_a_run(tmp_path, case)
    assert experiments.main(["summary", "--run", str(folder)]) == 2
    err = capsys.readouterr().err
    assert says in err and str(folder) in err and "python -m krul.experiments run SLUG --out DIR" in err
