"""The package layout shows the architecture: no import cycles, a lower layer never imports a higher
one, and imports inside functions are kept for heavy optional dependencies.

Read from the source with `ast` (nothing is imported), counting top-level and function-level
imports, absolute and relative. `if TYPE_CHECKING:` imports never run, so they are exempt.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "adaptkit"

# Lowest first. Keyed by the first name under `adaptkit`. `zoo` sits with the core because
# `core/backbone.py` resolves zoo names (and imports nothing of adaptkit itself).
LAYERS: list[tuple[str, ...]] = [
    ("core", "zoo"),
    ("methods",),
    ("interop",),
    ("data", "corpora", "segments"),
    ("generation",),
    ("tasks",),
    ("evaluation",),
    ("training",),
    ("serving",),
    ("bench",),
    ("cli",),
]
# `adaptkit/__init__.py`, the public face, re-exports from every layer; nothing inside imports it.
PUBLIC_FACE = len(LAYERS)

# Third-party packages that may be imported inside a function, and only these: each is slow to import
# (or a server stack) and only one path needs it, so `import adaptkit` and `adaptkit --help` don't pay.
FUNCTION_LEVEL_ALLOWED = {
    "peft": "~5 s to import; only the peft interop and the benchmark's peers use it",
    "accelerate": "~1.5 s; only a training run and file translation under accelerate launch need it",
    "datasets": "~1.4 s; only the paths that load or build a dataset",
    "sacrebleu": "only scoring generated text",
    "matplotlib": "only the benchmark's plots",
    "gguf": "only converting a GGUF download in the zoo",
    "fastapi": "only the service",
    "uvicorn": "only the service",
    "ray": "only distributed serving and file translation on Ray actors",
    "torchao": "optional (the quant extra); only ak.load(..., quantize='int8' or 'int8-dynamic') on CPU",
    "bitsandbytes": "optional, CUDA only; only ak.load(..., quantize=...) on a GPU",
}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # a module of the package, or the top name of a third-party / stdlib module
    internal: bool
    line: int
    in_function: bool
    type_checking: bool


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(name: str, modules: set[str]) -> str:
    """The deepest module of the package that `name` names (`a.b.func` → `a.b`)."""
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def collect_imports(root: Path, package: str = PACKAGE) -> tuple[set[str], list[Import]]:
    """Every module under `root/package` and every import statement in them."""
    files = {module_name(root, p): p for p in sorted((root / package).rglob("*.py"))}
    modules = set(files)
    found: list[Import] = []

    def record(source: str, name: str, node: ast.stmt, in_function: bool, type_checking: bool) -> None:
        internal = name == package or name.startswith(package + ".")
        target = _resolve(name, modules) if internal else name.split(".")[0]
        found.append(Import(source, target, internal, node.lineno, in_function, type_checking))

    for source, path in files.items():
        is_package = path.name == "__init__.py"

        def visit(node: ast.AST, in_function: bool, type_checking: bool, source: str = source,
                  is_package: bool = is_package) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.Import):
                    for alias in child.names:
                        record(source, alias.name, child, in_function, type_checking)
                elif isinstance(child, ast.ImportFrom):
                    if child.level:
                        base = source.split(".") if is_package else source.split(".")[:-1]
                        base = base[:len(base) - (child.level - 1)]
                        stem = ".".join(base + ([child.module] if child.module else []))
                    else:
                        stem = child.module or ""
                    for alias in child.names:  # `from pkg import mod` imports the module pkg.mod
                        full = f"{stem}.{alias.name}"
                        record(source, full if full in modules else stem, child, in_function, type_checking)
                elif isinstance(child, ast.If) and _is_type_checking(child.test):
                    for stmt in child.body:
                        visit(ast.Module(body=[stmt], type_ignores=[]), in_function, True)
                    for stmt in child.orelse:
                        visit(ast.Module(body=[stmt], type_ignores=[]), in_function, type_checking)
                else:
                    visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                    ast.Lambda)), type_checking)

        visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), False, False)
    return modules, found


def import_graph(imports: list[Import]) -> dict[str, set[str]]:
    """Module → the package's modules it imports when it runs (TYPE_CHECKING imports never do)."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        graph.setdefault(imp.source, set())
        if imp.internal and not imp.type_checking and imp.target != imp.source:
            graph[imp.source].add(imp.target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) per strongly connected component (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_cycle_in(sorted(c)[0], c, graph) for c in components]


def _cycle_in(start: str, component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest path start → … → start inside one component (breadth first)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph.get(node, set()) & component):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if nxt not in previous:
                    previous[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def layer_of(module: str, package: str = PACKAGE) -> int:
    if module == package:
        return PUBLIC_FACE
    first = module.split(".")[1]
    for rank, names in enumerate(LAYERS):
        if first in names:
            return rank
    raise AssertionError(f"{module} is in no layer: add {first!r} to LAYERS in tests/test_layout.py")


def layer_violations(imports: list[Import], package: str = PACKAGE) -> list[str]:
    out = set()
    for imp in imports:
        if not imp.internal or imp.type_checking or imp.source == package:
            continue
        if layer_of(imp.target, package) > layer_of(imp.source, package):
            out.add(f"{imp.source}:{imp.line} imports {imp.target}, a higher layer")
    return sorted(out)


def needs_optional_dep(imports: list[Import]) -> dict[str, set[str]]:
    """Module → the allowed optional packages that importing it pulls in (through module-level imports)."""
    direct: dict[str, set[str]] = {}
    graph: dict[str, set[str]] = {}
    for imp in imports:
        if imp.in_function or imp.type_checking:
            continue
        if imp.internal:
            graph.setdefault(imp.source, set()).add(imp.target)
        elif imp.target in FUNCTION_LEVEL_ALLOWED:
            direct.setdefault(imp.source, set()).add(imp.target)

    def pulled(module: str, seen: set[str]) -> set[str]:
        seen.add(module)
        out = set(direct.get(module, ()))
        for nxt in graph.get(module, ()):
            if nxt not in seen:
                out |= pulled(nxt, seen)
        return out

    return {m: deps for m in {i.source for i in imports} if (deps := pulled(m, set()))}


def function_import_violations(imports: list[Import]) -> list[str]:
    """Imports inside functions that are not of an allowed optional package, nor of one of the package's
    modules that needs one (e.g. the service's app, which needs fastapi: `adaptkit --help` must work without)."""
    optional = needs_optional_dep(imports)
    out = set()
    for imp in imports:
        if not imp.in_function or imp.type_checking:
            continue
        if imp.internal and imp.target not in optional:
            out.add(f"{imp.source}:{imp.line} imports {imp.target} inside a function: import it at the top")
        elif not imp.internal and imp.target not in FUNCTION_LEVEL_ALLOWED:
            out.add(f"{imp.source}:{imp.line} imports {imp.target} inside a function: import it at the top "
                    "(or, if it is heavy and optional, add it to FUNCTION_LEVEL_ALLOWED with the reason)")
    return sorted(out)


@pytest.fixture(scope="module")
def project() -> tuple[set[str], list[Import]]:
    return collect_imports(SRC)


# -- the checker itself, on a made-up package ----------------------------------------------------

def test_checker_finds_cycles_layers_and_function_imports(tmp_path):
    pkg = tmp_path / "adaptkit"
    for folder in ("core", "bench", "cli"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from adaptkit.cli import run\n")  # the public face may import anything
    (pkg / "core" / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from adaptkit.cli import x\n"
        "def f():\n    import yaml\n    import peft\n")
    (pkg / "bench" / "runner.py").write_text("from . import report\n")
    (pkg / "bench" / "report.py").write_text("def g():\n    from .runner import environment\n")
    (pkg / "cli" / "__init__.py").write_text("from ..bench import runner\nfrom adaptkit.core.a import f\n")
    (pkg / "core" / "b.py").write_text("import adaptkit.cli\n")
    (pkg / "bench" / "app.py").write_text("import fastapi\n")  # needs an optional package: may be imported lazily
    (pkg / "bench" / "serve.py").write_text("def h():\n    from adaptkit.bench import app\n")

    modules, imports = collect_imports(tmp_path)
    assert modules == {"adaptkit", "adaptkit.core", "adaptkit.core.a", "adaptkit.core.b", "adaptkit.bench",
                       "adaptkit.bench.runner", "adaptkit.bench.report", "adaptkit.bench.app", "adaptkit.bench.serve",
                       "adaptkit.cli"}
    graph = import_graph(imports)
    assert graph["adaptkit.cli"] == {"adaptkit.bench.runner", "adaptkit.core.a"}
    assert graph["adaptkit.core.a"] == set()  # TYPE_CHECKING only
    assert find_cycles(graph) == [["adaptkit.bench.report", "adaptkit.bench.runner", "adaptkit.bench.report"]]
    assert layer_violations(imports) == ["adaptkit.core.b:1 imports adaptkit.cli, a higher layer"]
    assert [v.split(" inside")[0] for v in function_import_violations(imports)] == [
        "adaptkit.bench.report:2 imports adaptkit.bench.runner", "adaptkit.core.a:5 imports yaml"]


def test_checker_sees_the_project(project):
    modules, imports = project
    assert {"adaptkit.core.bank", "adaptkit.cli.train", "adaptkit.bench.runner", "adaptkit.cli.flags"} <= modules
    graph = import_graph(imports)
    assert "adaptkit.training.config" in graph["adaptkit.cli.train"]
    assert "adaptkit.core.routing" in graph["adaptkit.core.bank"]


# -- the project ---------------------------------------------------------------------------------

def test_no_import_cycles(project):
    cycles = find_cycles(import_graph(project[1]))  # one per tangle: fix it and the next one shows
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_lower_layers_never_import_higher_ones(project):
    modules, imports = project
    for module in modules - {PACKAGE}:
        layer_of(module)  # every module is placed
    bad = layer_violations(imports)
    assert not bad, "layer order " + " < ".join("/".join(names) for names in LAYERS) + ":\n" + "\n".join(bad)


def test_function_level_imports_only_for_heavy_optional_deps(project):
    bad = function_import_violations(project[1])
    assert not bad, "\n".join(bad)
