"""The package's layers only point down: no import cycle, and runtime code never imports evaluation or training."""

from __future__ import annotations

import subprocess
import sys

import grimp

LOW_LEVEL = ("kronos.inference", "kronos.model", "kronos.data", "kronos.serve")
UPPER = ("kronos.evaluate", "kronos.train", "kronos.pipeline", "kronos.cli", "kronos.contrib")


def _graph() -> grimp.ImportGraph:
    return grimp.build_graph("kronos")  # every import statement, function-local ones included


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (iterative Tarjan)."""
    deps = {m: sorted(graph.find_modules_directly_imported_by(m) - {m}) for m in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    for root in sorted(deps):
        if root in index:
            continue
        work = [(root, iter(deps[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(deps[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    assert len(graph.modules) > 40
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = grimp.ImportGraph()
    for a, b in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d")):
        graph.add_import(importer=a, imported=b)
    assert _cycles(graph) == [["p.a", "p.b", "p.c"]]


def test_runtime_layers_import_nothing_from_evaluation_training_or_the_cli():
    graph = _graph()
    upward = {
        m: sorted(d for d in graph.find_modules_directly_imported_by(m) if d.startswith(UPPER))
        for m in graph.modules
        if m.startswith(LOW_LEVEL)
    }
    assert {m: d for m, d in upward.items() if d} == {}


def test_the_service_and_a_calibration_load_without_plotting_code():
    code = (
        "import sys, kronos.serve.app, kronos.inference.bands; "
        "print(sorted(m for m in sys.modules if m.startswith(('matplotlib', 'kronos.evaluate', 'kronos.train'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
