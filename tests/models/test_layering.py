"""Dependencies point down: nothing under promptkd/models/ reaches a promptkd module above it (run
folders, settings, inputs, the engine, stages, deploy, the CLI, the toy world, the package's entry
layer), neither directly nor through the modules it imports, and not even inside a function. Model
sources from above (the toy world) reach models/ through its registry (models/sources.py).

promptkd/deploy.py (the classifier a user loads) sits just above models/ and is held to the same
rule, with one more name: the package itself, for its `__version__` (its imports are followed too)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from promptkd.errors import PromptKDError
from promptkd.models import sources

SRC = Path(__file__).resolve().parents[2] / "src"
# What models/ may reach: the leaf helpers (errors, artifact files, content hashes, logging, lazy package
# attributes) and the components the design puts beside models/ (the KD maths, prompt templates, dataset
# names), which import nothing but leaves and each other.
LOW_LEVEL = ("promptkd.errors", "promptkd.artifacts", "promptkd.files", "promptkd.logs", "promptkd.lazy")
COMPONENTS = ("promptkd.models", "promptkd.kd", "promptkd.templates", "promptkd.data")
ALLOWED = LOW_LEVEL + COMPONENTS


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")


def _imported(source: str, module: str, is_package: bool) -> set[str]:
    """Every promptkd module `source` (the text of `module`) imports, anywhere in it: top-level and
    function-local import statements, relative imports, and import_module / __import__ of a literal."""
    package = module if is_package else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            # `from promptkd import runs` imports promptkd.runs; `from promptkd import load` the package itself
            out |= {f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base for a in node.names}
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) \
                and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__"):
            out.add(node.args[0].value)
    return {m for m in out if m == "promptkd" or m.startswith("promptkd.")}


def _is_module(name: str) -> bool:
    path = SRC.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _allowed(module: str) -> bool:
    return any(module == a or module.startswith(a + ".") for a in ALLOWED)


def _violations(module: str, source: str, is_package: bool = False) -> list[str]:
    """The imports of `source` (the text of `module`) that leave ALLOWED."""
    return [f"{module} imports {m}" for m in sorted(_imported(source, module, is_package)) if not _allowed(m)]


def _import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted((SRC / "promptkd").rglob("*.py")):
        name = _module_name(path)
        graph[name] = _imported(path.read_text(), name, path.name == "__init__.py")
    return graph


def _reached_from_models(graph: dict[str, set[str]]) -> list[str]:
    """Each module outside ALLOWED that a models/ module reaches, with the chain of imports."""
    return _reached_from(graph, [m for m in graph if m == "promptkd.models" or m.startswith("promptkd.models.")])


def _reached_from(graph: dict[str, set[str]], starts: list[str], also: tuple[str, ...] = ()) -> list[str]:
    """Each module outside ALLOWED (and the exact names `also`) that `starts` reach, with the chain."""
    chains = {m: [m] for m in starts}
    todo, out = list(chains), []
    while todo:
        module = todo.pop()
        for target in sorted(graph.get(module, ())):
            if target in chains:
                continue
            chains[target] = [*chains[module], target]
            if _allowed(target) or target in also:
                todo.append(target)  # an allowed module may still lead upward
            else:
                out.append(" -> ".join(chains[target]))
    return sorted(out)


def test_models_reach_nothing_above_them():
    assert _reached_from_models(_import_graph()) == []


def test_deploy_reaches_nothing_above_it():
    assert _reached_from(_import_graph(), ["promptkd.deploy"], also=("promptkd",)) == []


def test_the_deploy_check_finds_a_stage_reached_through_the_package():
    graph = {"promptkd.deploy": {"promptkd", "promptkd.models.wrappers"}, "promptkd": {"promptkd.stages.a"},
             "promptkd.models.wrappers": set()}
    assert _reached_from(graph, ["promptkd.deploy"], also=("promptkd",)) == [
        "promptkd.deploy -> promptkd -> promptkd.stages.a"]


def test_the_chain_check_finds_an_import_from_above_through_an_allowed_module():
    graph = {"promptkd.models.a": {"promptkd.kd"}, "promptkd.kd": {"promptkd.runs"}, "promptkd.runs": set()}
    assert _reached_from_models(graph) == ["promptkd.models.a -> promptkd.kd -> promptkd.runs"]


@pytest.mark.parametrize("line", [
    "def f():\n    from promptkd.toy.models import build_toy_clip\n",
    "import promptkd.runs\n",
    "from promptkd import settings\n",
    "from promptkd import load\n",
    "from ..stages import distill\n",
    "import importlib\nimportlib.import_module('promptkd.toy')\n",
])
def test_the_check_finds_an_import_from_above(line):
    assert _violations("promptkd.models.loading", line) != []


def test_the_check_lets_models_and_low_level_imports_pass():
    text = "from promptkd.files import file_record\nfrom .sources import random_weights\nimport promptkd.models.prompts\n"
    assert _violations("promptkd.models.loading", text) == []


def test_a_registered_source_loads_its_names(monkeypatch):
    from promptkd.models.loading import load_clip

    monkeypatch.setattr(sources, "_SOURCES", dict(sources._SOURCES))
    calls = []
    sources.register_model_source("mine-", lambda model, pretrained, **kw: calls.append((model, pretrained, kw)))
    sources.register_model_source("mine-big-", lambda model, pretrained, **kw: calls.append(("big", model)))
    load_clip("mine-a", "w.pt", init_seed=3)
    load_clip("mine-big-b")
    assert calls == [("mine-a", "w.pt", {"device": "cpu", "init_seed": 3}), ("big", "mine-big-b")]
    with pytest.raises(PromptKDError, match="unknown model 'other-a'"):
        load_clip("other-a")


def test_a_source_named_by_string_is_imported_on_first_use(monkeypatch):
    monkeypatch.setattr(sources, "_SOURCES", dict(sources._SOURCES))
    sources.register_model_source("gone-", "promptkd.no_such_module:load")
    with pytest.raises(PromptKDError, match="gone-a: its model source 'promptkd.no_such_module:load' cannot be"):
        sources.source_loader("gone-a")
    with pytest.raises(ValueError, match="module:function"):
        sources.register_model_source("bad-", "promptkd.toy.models")


def test_toy_models_load_without_anyone_importing_the_toy_package():
    """The entry layer registers the toy source by name: a bare `load_clip("toy-student")` finds it,
    and importing promptkd imports neither torch nor the toy package."""
    probe = ("import sys\nfrom promptkd.models import sources\n"
             "before = sorted(m for m in sys.modules if m == 'torch' or m.startswith('promptkd.toy'))\n"
             "from promptkd.models.loading import load_clip\n"
             "b = load_clip('toy-student')\n"
             "print(before, b.name, b.pretrained, type(b.model).__name__)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "toy-student", "toy", "CLIP"]
