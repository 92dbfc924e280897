"""The package's layout: every module imports alone, no import cycles, one module schedules.

These tests read the source (``ast``) rather than trusting conventions, so a change that
adds a cycle or a second place that talks to the scheduler fails here.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "anomaly_dask"
#: The only modules allowed to import ``distributed`` (the CLI only through compute).
SCHEDULING = {"anomaly_dask.compute"}
#: Most lines a module may have (the redesign's target: "about 500").
MAX_LINES = 520


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Package-internal modules ``name`` imports, at module level or inside functions (a
    deferred import still ties the two modules together)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }  # imports for type hints only never run, so they tie nothing together
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("anomaly_dask"):
                found.add(target)
                for alias in node.names:  # ``from . import compute`` imports a module
                    found.add(f"{target}.{alias.name}")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("anomaly_dask"))
    return found


def test_every_module_imports():
    """All modules import in a fresh interpreter (one process: torch loads once)."""
    names = sorted(_modules())
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    proc = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-1500:]


def test_no_import_cycles():
    modules = _modules()
    graph = {
        name: {m for m in _imports(name, path) if m in modules and m != name and m != "anomaly_dask"}
        for name, path in modules.items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_only_compute_talks_to_the_scheduler():
    offenders = []
    for name, path in _modules().items():
        if name in SCHEDULING or name.startswith("anomaly_dask.compute."):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "distributed" for a in node.names):
                offenders.append(f"{name}:{node.lineno} imports distributed")
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "distributed":
                offenders.append(f"{name}:{node.lineno} imports from distributed")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                attr, owner = node.func.attr, node.func.value
                on_client = isinstance(owner, ast.Name) and owner.id == "client"
                if attr in ("scatter", "submit", "gather", "map") and on_client:
                    offenders.append(f"{name}:{node.lineno} calls client.{attr}")
                if attr == "compute" and on_client:
                    offenders.append(f"{name}:{node.lineno} calls client.compute")
                if attr == "delayed" and isinstance(owner, ast.Name) and owner.id == "dask":
                    offenders.append(f"{name}:{node.lineno} builds dask.delayed tasks")
    assert not offenders, offenders


def test_modules_stay_small():
    big = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_package_imports_cleanly_in_this_process():
    mod = importlib.import_module("anomaly_dask")
    assert hasattr(mod, "AnomalyDetector")
