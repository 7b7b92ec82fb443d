"""The package's import graph: no circles, nothing imports upward, no import hidden inside a function
(tests/test_bench_imports.py checks the developer tools in bench/ and that the package never imports them).

The layers, lowest first (README.md's architecture map states the same): a module may import modules of its
own layer or of lower ones. Read from the source (``ast``), so a function-level import counts as an edge too.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "margin_kernels"

#: (layer, the modules in it: a name stands for itself and everything below it)
LAYERS = (
    ("numerics", ("norms", "precision", "native_build", "_native", "subcenters", "batch_reduction", "memory_budget")),
    ("losses", ("losses", "schedules")),
    ("kernels", ("backends",)),
    ("op", ("ops", "row_statistics", "validation", "reference", "sampling", "initialization")),
    ("driver", ("functional",)),
    ("training", ("regularizers", "optim")),
    ("heads", ("head_base", "head", "distributed", "integrations")),
    ("public", ("", "bench")),  # margin_kernels/__init__.py (the public names) and the CLI that uses them
)
#: function-level imports that are deliberate, with the reason (anything else is a hidden edge)
DEFERRED = {
    ("margin_kernels", "margin_kernels.distributed"):
        "the model-parallel head is a lazy attribute: `import margin_kernels` loads no torch.distributed code",
}


def _modules() -> dict:
    found = {}
    for path in (ROOT / PACKAGE).rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _imports(modules: dict):
    """(importer, imported module, line, at module level) for every import of a package module."""
    for name, (path, is_package) in modules.items():
        base = name.split(".") if is_package else name.split(".")[:-1]
        module_level = {id(node) for node in ast.parse(path.read_text()).body}
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = (".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
                          if node.level else node.module)
                names = [f"{target}.{alias.name}" for alias in node.names]
                targets = [n if n in modules else target for n in names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in modules and target != name:
                    yield name, target, node.lineno, node.col_offset == 0


def _layer(module: str) -> int:
    inner = module[len(PACKAGE) + 1:] if module != PACKAGE else ""
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if inner == prefix or (prefix and inner.startswith(prefix + ".")) or (not prefix and not inner):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), rank)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS (and to the README's map)"
    return best[1]


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return modules, list(_imports(modules))


def test_every_module_has_a_layer(graph):
    modules, _ = graph
    for module in modules:
        _layer(module)


def test_nothing_imports_upward(graph):
    _, edges = graph
    upward = [f"{a} ({LAYERS[_layer(a)][0]}) imports {b} ({LAYERS[_layer(b)][0]}), line {line}"
              for a, b, line, _ in edges if _layer(b) > _layer(a)]
    assert not upward, "\n".join(upward)


def test_no_function_level_imports_but_the_deliberate_ones(graph):
    _, edges = graph
    hidden = [f"{a} imports {b} inside a function, line {line}" for a, b, line, top in edges
              if not top and (a, b) not in DEFERRED]
    assert not hidden, "\n".join(hidden)


def test_no_import_circles(graph):
    modules, edges = graph
    successors = {m: set() for m in modules}
    for a, b, _, _ in edges:
        successors[a].add(b)
    # a package's __init__ importing its own submodules is how Python packages work; the circle that matters
    # is a submodule importing back into something that imports it
    for module in modules:
        seen, frontier = set(), [b for b in successors[module] if not module.startswith(b + ".")]
        while frontier:
            nxt = frontier.pop()
            if nxt in seen:
                continue
            seen.add(nxt)
            frontier.extend(b for b in successors[nxt] if not nxt.startswith(b + ".") or b == module)
        assert module not in seen, f"{module} imports itself back through {sorted(seen)}"


def test_the_checker_sees_a_cycle_and_an_upward_import():
    """The checks above can fail: an upward edge is ranked as such, and the layer table is consulted."""
    assert _layer("margin_kernels.backends.chunk_loop") < _layer("margin_kernels.ops")
    assert _layer("margin_kernels.losses.base") < _layer("margin_kernels.backends.sinks")
    assert _layer("margin_kernels") == len(LAYERS) - 1
