"""The benchmark code's import graph, read from the source (every import statement, those inside functions
included): no module of margin_kernels.bench or of the developer tools in bench/ imports a module that
imports it back, directly or through others; and the installed package never imports the tools (they are not
installed: an import of them would fail on every user's machine)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute names; ``from pkg import name`` counts as pkg.name too (a
    submodule imported that way is a module import)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def _graph(folders) -> dict:
    files = [p for folder in folders for p in sorted((ROOT / folder).rglob("*.py"))]
    modules = {_module_name(p): p for p in files}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _cycle(graph: dict):
    """One import circle as a list of modules, or None."""
    state: dict = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return trail[trail.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, trail + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None
    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_checker_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_in_the_benchmark_code():
    graph = _graph(["margin_kernels/bench", "bench"])
    assert "margin_kernels.bench.cli" in graph and "bench.chunks" in graph  # the walk found them
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_installed_package_never_imports_the_developer_tools():
    for path in sorted((ROOT / "margin_kernels").rglob("*.py")):
        bad = sorted(m for m in _imports(path) if m == "bench" or m.startswith("bench."))
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
