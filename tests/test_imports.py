"""The parts of truffula import each other without loops.

The graph is read from the source with ``ast``: a node is a top-level part of the package (a
subpackage such as ``runner``, or a module such as ``config``), an edge an import anywhere in a
file (inside functions too; imports under ``if TYPE_CHECKING:`` aside). Every strongly connected
component of more than one node is a loop.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "truffula"

KNOWN_LOOPS: set[frozenset[str]] = set()


def _part(module: str) -> str | None:
    """``truffula.runner.runner`` -> ``runner``; None outside truffula."""
    parts = module.split(".")
    return parts[1] if parts[0] == "truffula" and len(parts) > 1 else None


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, package: str) -> list[str]:
    """Modules imported in ``tree`` (of a module in ``package``), outside TYPE_CHECKING blocks."""
    out: list[str] = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _type_checking(node):
            out += [m for child in node.orelse for m in _imports(child, package)]
            continue
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing module's package
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            out += [base, *(f"{base}.{alias.name}" for alias in node.names)]
        out += _imports(node, package)
    return out


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for path in ROOT.rglob("*.py"):
        parts = ("truffula", *path.relative_to(ROOT).with_suffix("").parts)
        is_init = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_init else parts)
        package = module if is_init else module.rpartition(".")[0]
        source = _part(module)
        if source is None:
            continue
        graph[source]
        for imported in _imports(ast.parse(path.read_text(), str(path)), package):
            target = _part(imported)
            if target is not None and target != source:
                graph[source].add(target)
    return graph


def loops(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """Strongly connected components of more than one node (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[frozenset[str]] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.add(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read() -> None:
    graph = import_graph()
    assert {"forward", "kernels", "layers", "models", "runner", "sampling"} <= set(graph)
    assert "forward" in graph["kernels"] and "kernels" in graph["layers"]


def test_no_import_loop_between_the_parts_of_truffula() -> None:
    found = loops(import_graph())
    assert found <= KNOWN_LOOPS, sorted(sorted(c) for c in found - KNOWN_LOOPS)


def test_the_per_step_records_are_on_the_ground_floor() -> None:
    """Nothing below the runner imports it; ``forward`` imports no other part but ``device``."""
    graph = import_graph()
    for part in ("forward", "kernels", "layers", "models", "sampling", "scheduler"):
        assert "runner" not in graph[part], part
    assert graph["forward"] <= {"device"}


def test_analysis_is_a_leaf() -> None:
    """``truffula.analysis`` reads responses: it imports no part of truffula, and importing all
    of it (renderers included) loads no engine, runner, scheduler, server or CLI module."""
    assert import_graph()["analysis"] == set()
    modules = sorted(p.stem for p in (ROOT / "analysis").glob("*.py") if p.stem != "__init__")
    assert {"report", "terminal", "html"} <= set(modules)
    code = (
        "import sys, truffula.analysis\n"
        + "".join(f"import truffula.analysis.{m}\n" for m in modules)
        + "print('\\n'.join(m for m in sys.modules if m.split('.')[0] in ('truffula', 'torch')))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    loaded = set(proc.stdout.split())
    assert "truffula.analysis.report" in loaded
    heavy = ("engine", "runner", "scheduler", "server", "cli", "models", "kernels")
    assert not {m for m in loaded if _part(m) in heavy}, sorted(loaded)
    assert "torch" not in loaded


def test_loops_are_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert loops(graph) == {frozenset({"a", "b", "c"})}
