"""REPRODUCE.md quotes the committed reference runs: each verdict value and its holds / does not hold."""
from krul import paths
from krul.experiments import format_value, summary_rows


def _row(doc: str, slug: str) -> str:
    rows = [line for line in doc.splitlines() if line.startswith("|") and f"notebooks/{slug}.ipynb" in line]
    assert len(rows) == 1, f"REPRODUCE.md needs exactly one figure-table row for {slug}"
    return rows[0]


def test_reproduce_md_quotes_every_committed_verdict():
    doc = (paths.REPO_ROOT / "REPRODUCE.md").read_text()
    for r in summary_rows():
        if r["run"] != "cpu-default":
            continue
        row = _row(doc, r["slug"])
        assert format_value(r["value"]) in row, (r["slug"], format_value(r["value"]))
        assert r["verdict"] and (r["verdict"] in row), (r["slug"], r["verdict"])
        if r["verdict"] == "holds":
            assert "does not hold" not in row.split("|")[-2], r["slug"]


def test_reproduce_md_quotes_every_judged_gpu_run():
    """A GPU reference run (`h200-<sha>`) that carries a verdict has a row in REPRODUCE.md's GPU
    table with its value and verdict."""
    doc = (paths.REPO_ROOT / "REPRODUCE.md").read_text()
    judged = [r for r in summary_rows() if r["run"] != "cpu-default" and r["verdict"]]
    for r in judged:
        rows = [line for line in doc.splitlines()
                if line.startswith(f"| {r['slug']} | {r['run']} |")]
        assert len(rows) == 1, (r["slug"], r["run"])
        assert format_value(r["value"]) in rows[0] and rows[0].rstrip(" |").endswith(r["verdict"]), rows[0]
