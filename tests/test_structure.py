"""Layout rules a reader relies on: no promptkd module imports another that imports it back
(directly or through others), and no function is longer than a screen (80 lines)."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _module_imports() -> dict[str, set[str]]:
    mods = {}
    for path in (SRC / "promptkd").rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        mods[name] = path
    graph = {}
    for name, path in mods.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
        graph[name] = {t for t in targets if t in mods and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(_module_imports()) == []


def test_cycle_finder_finds_a_cycle():
    # the checker itself must be able to fail
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


MAX_FUNCTION_LINES = 80


def _long_functions(source: str, where: str) -> list[str]:
    """`where:name (N lines)` for each function or method in `source` longer than MAX_FUNCTION_LINES
    (from its `def` line, decorators excluded, to its last line)."""
    return [f"{where}:{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


def test_no_function_is_longer_than_80_lines():
    found = []
    for path in sorted((SRC / "promptkd").rglob("*.py")):
        found += _long_functions(path.read_text(), str(path.relative_to(SRC)))
    assert found == []


def test_the_length_check_names_a_long_function_and_passes_a_short_one():
    def body(indent: str, n: int) -> str:
        return "".join(f"{indent}x{i} = {i}\n" for i in range(n))

    assert _long_functions(f"def ok():\n{body('    ', MAX_FUNCTION_LINES - 1)}", "m.py") == []
    text = f"class C:\n    def long(self):\n{body(' ' * 8, MAX_FUNCTION_LINES)}"
    assert _long_functions(text, "m.py") == [f"m.py:long ({MAX_FUNCTION_LINES + 1} lines)"]
