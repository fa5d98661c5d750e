"""No import circle among krul's modules, function-level imports included; one module per figure."""
import ast
import pathlib

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
SRC = ROOT / "src"


def _edges() -> dict[str, set[str]]:
    """module -> the krul modules it imports anywhere in its file (top level or inside functions)."""
    mods = {p.relative_to(SRC).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__"): p
            for p in (SRC / "krul").rglob("*.py")}
    edges = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            edges[m] |= {n for n in names if n in mods and n not in (m, "krul")}
    return edges


def _circle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle (its modules, the first repeated at the end), or None."""
    state, stack = {}, []

    def dfs(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(edges[u]):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state:
                found = dfs(v)
                if found:
                    return found
        stack.pop()
        state[u] = 2
        return None

    for m in sorted(edges):
        if m not in state:
            found = dfs(m)
            if found:
                return found
    return None


def test_checker_finds_a_circle():
    assert _circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _circle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle():
    edges = _edges()
    assert "krul.policies" in edges and "krul.records" in edges["krul.policies"]  # function-level imports count
    circle = _circle(edges)
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_every_figure_has_its_module():
    """Each experiments/<slug>.yaml has src/krul/figures/<slug>.py defining run, claim and the YAML's METRIC,
    and krul.experiments registers exactly those modules."""
    from krul import experiments

    slugs = sorted(p.stem for p in (ROOT / "experiments").glob("fig*.yaml"))
    assert slugs
    for slug in slugs:
        path = SRC / "krul" / "figures" / f"{slug}.py"
        assert path.is_file(), f"{slug}: no module {path.relative_to(ROOT)}"
        tree = ast.parse(path.read_text())
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assigned = {t.id: n.value for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
                    if isinstance(t, ast.Name)}
        assert "run" in defined, f"{slug}: no run(cfg)"
        assert "claim" in defined or "claim" in assigned, f"{slug}: no claim(df, cfg)"
        metric = yaml.safe_load((ROOT / "experiments" / f"{slug}.yaml").read_text())["claim"]["metric"]
        assert isinstance(assigned.get("METRIC"), ast.Constant) and assigned["METRIC"].value == metric, \
            f"{slug}: METRIC is not the YAML's claim metric {metric!r}"
    assert sorted(experiments.RUNNERS) == slugs
    for slug in slugs:
        module = experiments.FIGURES[slug]
        assert experiments.CLAIM_METRICS[module.METRIC] is module.claim


def test_every_research_script_is_indexed():
    """Each *.py under experiments/ has its entry (question, answer, command) in experiments/calibration/INDEX.md."""
    index = (ROOT / "experiments" / "calibration" / "INDEX.md").read_text()
    entries = {line[4:].strip() for line in index.splitlines() if line.startswith("### ")}
    scripts = {p.relative_to(ROOT / "experiments" / "calibration").as_posix()
               if p.is_relative_to(ROOT / "experiments" / "calibration") else p.relative_to(ROOT).as_posix()
               for p in (ROOT / "experiments").rglob("*.py")}
    assert scripts, "no scripts found under experiments/"
    missing = sorted(scripts - entries)
    assert not missing, f"not in experiments/calibration/INDEX.md (add '### NAME' with question, answer, command): {missing}"
