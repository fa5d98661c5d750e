"""No import circle among krul's modules, function-level imports included."""
import ast
import pathlib

SRC = pathlib.Path(__file__).resolve().parents[2] / "src"


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
