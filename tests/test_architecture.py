"""Facts about the source tree that parsing the code shows (docs/architecture.md draws the same map).

- every module of ``losparse/`` is short enough to read in one sitting (at most 800 lines);
- imports run one way: no import circle among the project's modules; no module of the package imports the package
  root or ``utils``; ``common`` imports nothing of the package; the method (decomposition, layer, forms, compact,
  substitute, importance, distributed, pruner) never imports the tools built on it (calibration, one-shot,
  checkpoints, report, export, FSDP2, flags, runs);
- no ``utils._name`` or ``losparse.<module>._name`` is used outside the module that defines it; tests use a module's
  private names only in that module's own test file (``tests/test_<module>.py``);
- ``utils`` (the original module name) exports exactly ``losparse.__all__``, every name of it defined.
"""
import ast
import re
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "losparse"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
METHOD = {"common", "config", "decomposition", "forms", "layer", "compact", "substitute", "importance", "distributed",
          "pruner"}
TOOLS = {"calibration", "one_shot", "checkpoint", "report", "export", "fsdp2", "cli", "runs"}


def _project_files():
    """The repository's Python sources, Markdown and shell scripts (not the virtual environment or outputs)."""
    skip = {".venv", ".git", "outputs", "output", "build", "__pycache__"}
    return [p for p in REPO.rglob("*") if p.suffix in (".py", ".md", ".sh") and p.is_file()
            and not skip.intersection(p.relative_to(REPO).parts)]


def _module_name(path):
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[1:] if rel.parts[0] in ("tests", "benchmarks", "scripts") else rel.parts
    return ".".join(p for p in parts if p != "__init__") or "losparse"


def _imports(path):
    """The project modules ``path`` imports (``losparse``, ``losparse.<module>``, and top-level modules of the
    repository such as ``utils``), relative imports resolved."""
    tree = ast.parse(path.read_text())
    own = _module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    top = {p.stem for p in REPO.glob("*.py")} | {"losparse"}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = package + ("." + base if base else "")
            names = [base] + ([f"{base}.{a.name}" for a in node.names if a.name in MODULES]
                              if base == "losparse" else [])
        else:
            continue
        for n in names:
            if n.split(".")[0] in top:
                found.add(n if n.split(".")[0] == "losparse" else n.split(".")[0])
    return found


def test_every_package_module_is_short():
    lengths = {m: len((PACKAGE / f"{m}.py").read_text().splitlines()) for m in MODULES}
    assert len(MODULES) >= 12 and max(lengths.values()) <= 800, lengths


def test_imports_run_one_way():
    graph = {}
    for path in [p for p in _project_files() if p.suffix == ".py" and "remote_code" not in p.parts]:
        graph[_module_name(path)] = {n for n in _imports(path) if n != _module_name(path)}
    for m in MODULES:
        deps = graph[f"losparse.{m}"]
        assert not deps & {"losparse", "utils", "utils_fsdp"}, (m, deps)  # never the root, never the facade
        if m == "common":
            assert not deps, deps
        if m in METHOD:
            assert not deps & {f"losparse.{t}" for t in TOOLS}, (m, sorted(deps))
    state = {}

    def visit(node, stack):  # depth-first search for a circle
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert graph["utils"] == {"losparse"} and graph["utils_fsdp"] == {"losparse.fsdp2"}


_PRIVATE = [
    (re.compile(r"(?<![\w.])utils\._(?!_)\w+"), None),  # utils._name: the facade has no private names to lend
    (re.compile(r"(?<![\w.])losparse\.(\w+)\._(?!_)\w+"), 1),  # losparse.<module>._name
    (re.compile(r"from\s+losparse\.(\w+)\s+import\s+[^\n]*?(?<![\w.])_(?!_)\w+"), 1),  # from losparse.<m> import _n
    (re.compile(r"setattr\(\s*losparse\.(\w+)\s*,\s*[\"']_(?!_)\w+"), 1),  # monkeypatch.setattr(losparse.<m>, "_n")
]


def test_no_private_name_is_used_outside_its_module():
    offenders = []
    for path in _project_files():
        rel = path.relative_to(REPO)
        if rel == Path("tests", "test_architecture.py"):
            continue  # this file names the patterns
        text = path.read_text()
        for pattern, group in _PRIVATE:
            for hit in pattern.finditer(text):
                owner = hit.group(group) if group else None
                if owner is not None and rel in (Path("losparse", f"{owner}.py"), Path("tests", f"test_{owner}.py")):
                    continue  # the module itself, or its own tests
                offenders.append(f"{rel}: {hit.group(0)}")
    for m in MODULES:  # relative imports of another module's private names inside the package
        tree = ast.parse((PACKAGE / f"{m}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                offenders += [f"losparse/{m}.py: from .{node.module} import {a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert offenders == []


def test_the_facade_exports_the_public_api():
    import losparse
    import utils

    assert len(losparse.__all__) == len(set(losparse.__all__)) >= 50
    assert all(not n.startswith("_") for n in losparse.__all__)
    for name in losparse.__all__:
        assert getattr(utils, name) is getattr(losparse, name), name
    public = {n for n in vars(utils) if not n.startswith("_")}
    assert public == set(losparse.__all__)
    for name in ("substitute_layer_weights", "Pruner", "load_checkpoint", "save_checkpoint", "LinearLoSparse",
                 "low_rank_decomposition"):  # the original README's names
        assert name in losparse.__all__
