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
