"""gradscope's modules import one way, and each imports cleanly in a fresh interpreter.

The graph is read from the source (``ast``), not from ``sys.modules``: an edge A → B means that
executing A's module body imports B; ``import_graph(deferred=True)`` adds the imports inside
functions (they run later, but a cycle through them is still a cycle).
``from . import sub`` is an edge to the submodule ``sub``, not to the package; importing ``a.b.c``
also runs the packages ``a.b`` and ``a`` first, so those are edges too (except the importer's own
parent packages, which are already running when it does).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

import gradscope

ROOT = Path(gradscope.__file__).resolve().parent

# Renderers: they import the data classes, and are never imported by them (issue 16 item 4).
RENDERERS = ("gradscope.render", "gradscope.plot", "gradscope.integrations")


def _modules() -> Dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(tree: ast.Module, deferred: bool):
    """Import statements that run when the module body runs (not under TYPE_CHECKING); with
    ``deferred`` also those inside functions, which run when the function is called."""
    todo: List[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and not deferred:
            continue
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))


def _with_parents(target: str, importer: str) -> Set[str]:
    own = {importer.rsplit(".", i)[0] for i in range(importer.count(".") + 1)}
    parts = target.split(".")
    names = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return {n for n in names if n in MODULES and n not in own}


def import_graph(deferred: bool = False) -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = {}
    for name, path in MODULES.items():
        package = name if _is_package(name) else name.rsplit(".", 1)[0]
        deps: Set[str] = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8")), deferred):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
                targets = subs if subs and len(subs) == len(node.names) else [base] + subs
            for t in targets:
                deps |= _with_parents(t, name)
        deps.discard(name)
        graph[name] = deps
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[frozenset]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[frozenset] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_the_edges_it_should():
    g = import_graph()
    assert "gradscope.measure.sites" in g["gradscope.capture.probing"]
    assert "gradscope.measure" in g["gradscope.capture.probing"]       # the package runs first
    assert "gradscope.capture.watch" in g["gradscope.measure.probe"]
    assert "gradscope.capture.bptt" in g["gradscope.capture.replay"]   # from . import bptt
    assert "gradscope.capture" not in g["gradscope.capture.replay"]        # its own package


def test_no_import_cycle_among_gradscope_modules():
    assert cycles(import_graph()) == []


def test_no_import_cycle_counting_imports_inside_functions():
    assert cycles(import_graph(deferred=True)) == []


def _is_renderer(name: str) -> bool:
    return any(name == r or name.startswith(r + ".") for r in RENDERERS)


def test_data_never_imports_its_renderers():
    """Recording, the analysis (Diagnosis, RemedyTrials), capture, measure and checkpoint (its
    CheckpointReport) import no renderer, also not inside a function: their displays go through
    gradscope._renderers."""
    g = import_graph(deferred=True)
    data = [n for n in g if n == "gradscope.recording"
            or n.startswith(("gradscope.analysis.", "gradscope.capture.", "gradscope.measure.", "gradscope.estimators.",
                             "gradscope.checkpoint."))]
    assert "gradscope.analysis.diagnose" in data and "gradscope.analysis.trials" in data
    assert "gradscope.checkpoint.report" in data
    for name in data:
        assert not {d for d in g[name] if _is_renderer(d)}, name
    assert "gradscope._renderers" in g["gradscope.recording"]
    assert "gradscope.render.html" in g["gradscope.render"]              # importing render registers


def test_the_renderer_table_imports_nothing():
    tree = ast.parse(MODULES["gradscope._renderers"].read_text(encoding="utf-8"))
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def test_import_gradscope_registers_every_display():
    """A fresh ``import gradscope`` fills the renderer table the data classes display with."""
    code = ("import gradscope, gradscope._renderers as r\n"
            "print(*sorted(r._RENDERERS))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=ROOT.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["checkpoint_report.html", "checkpoint_report.markdown", "checkpoint_report.text",
                                   "diagnosis.html", "diagnosis.markdown", "diagnosis.repr_html", "diagnosis.text",
                                   "recording.repr_html", "recording.tensorboard", "trials.markdown",
                                   "trials.repr_html", "trials.text"]


def test_capture_and_measure_import_one_way():
    """capture.probing imports measure's site and depth measurement; those read what capture
    recorded (sites, the attention layout) but never import capture.watch; only measure.probe
    does, and nothing in capture imports measure.probe, also not from inside a function. Of
    capture only probing imports measure at all."""
    g = import_graph(deferred=True)
    describe = {"gradscope.capture.sites", "gradscope.capture.attention", "gradscope.capture.attention.layout",
                "gradscope.capture.attention.calls", "gradscope.capture.attention.hf"}
    for name, deps in g.items():
        if name.startswith("gradscope.capture."):
            assert "gradscope.measure.probe" not in deps, name
            if name != "gradscope.capture.probing":
                assert not {d for d in deps if d.startswith("gradscope.measure")}, name
        if name.startswith("gradscope.measure.") and name != "gradscope.measure.probe":
            assert not {d for d in deps if d.startswith("gradscope.capture.")} - describe, name


def test_every_module_imports_cleanly_in_a_fresh_interpreter():
    names = sorted(n for n in MODULES if n != "gradscope.__main__")
    code = ("import importlib, sys, warnings\n"
            "warnings.simplefilter('error')\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module(name)\n"
            "print('ok', len(sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=ROOT.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok"), done.stdout + done.stderr
