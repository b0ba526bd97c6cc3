"""The shape of the source tree: the layer table, no import cycles, no private names imported
across modules, at most five modules at the package root, a tests folder per package, no
oversized modules, a torch-free runtime."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support import REPO

PACKAGES = ("jaxllm", "pallas_kernels")
TEST_ONLY = {"torch", "transformers", "pytest", "hypothesis"}
MAX_LINES = 600
MAX_ROOT_MODULES = 5

# The layer table: which parts of the tree a part may import (besides itself). A part is a
# package of jaxllm (``jaxllm.engine.spec_decode`` is part of ``engine``), "base" for the
# modules at jaxllm's root, "public" for ``jaxllm/__init__.py`` (the entry points), or the
# kernels. What a part may import, it may import transitively: serving on top, the engine
# below it, the model, sampling and image processing below that, and layout and config at the
# bottom; weights (files <-> arrays) and aot (compiling without a device) beside the layers
# they read.
LAYERS: dict[str, set[str]] = {
    "pallas_kernels": set(),
    "base": set(),  # config, sharding, layout, kv_cache, buckets
    "model": {"base", "pallas_kernels"},
    "sample": {"base"},
    "multimodal": {"base"},
    "runtime": {"model", "sample", "multimodal"},  # the Model handle, generate(), admission
    "weights": {"model", "runtime"},  # load_model returns a handle
    "public": {"runtime", "weights"},
    "engine": {"runtime", "weights"},
    "aot": {"engine"},
    "serve": {"aot", "public"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Internal modules that ``path`` imports anywhere (module level, functions, TYPE_CHECKING).

    ``from pkg import sub`` counts as importing ``pkg.sub`` when that is a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in modules else node.module)
    return {m for m in found if m in modules}


def _part(module: str) -> str:
    """The layer-table part a module belongs to."""
    parts = module.split(".")
    if parts[0] != "jaxllm":
        return parts[0]
    if len(parts) == 1:
        return "public"
    return "base" if (REPO / "jaxllm" / f"{parts[1]}.py").is_file() else parts[1]


def _allowed(table: dict[str, set[str]]) -> dict[str, set[str]]:
    """Each part's allowed imports, closed transitively, itself included."""
    closed = {}
    for part in table:
        seen, todo = {part}, list(table[part])
        while todo:
            if (nxt := todo.pop()) not in seen:
                seen.add(nxt)
                todo += table[nxt]
        closed[part] = seen
    return closed


def _layer_violations(graph: dict[str, set[str]], table: dict[str, set[str]]) -> list[str]:
    allowed = _allowed(table)
    return [f"{m} ({_part(m)}) imports {d} ({_part(d)})" for m, deps in sorted(graph.items())
            for d in sorted(deps) if _part(d) not in allowed[_part(m)]]


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    graph = _graph()
    assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph))


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_layer_table_names_every_part():
    parts = {_part(m) for m in _modules()}
    assert parts == set(LAYERS), f"parts without a row: {parts - set(LAYERS)}; " \
        f"rows without a part: {set(LAYERS) - parts}"


def test_layer_table_check_finds_an_upward_import():
    """The check itself: the model importing the engine, or base importing anything above it,
    is reported; the engine importing the model (transitively allowed) is not."""
    graph = {"jaxllm.model.llama4": {"jaxllm.engine.step"},
             "jaxllm.layout": {"jaxllm.sample.sampling"},
             "jaxllm.engine.step": {"jaxllm.model.llama4", "jaxllm.layout"}}
    assert _layer_violations(graph, LAYERS) == [
        "jaxllm.layout (base) imports jaxllm.sample.sampling (sample)",
        "jaxllm.model.llama4 (model) imports jaxllm.engine.step (engine)"]


def test_every_import_follows_the_layer_table():
    """Every import anywhere in a module (module level, functions, TYPE_CHECKING) counts."""
    assert not _layer_violations(_graph(), LAYERS)


def test_no_relative_imports():
    """Relative imports would slip past the layer check."""
    relative = [str(path.relative_to(REPO)) for path in _modules().values()
                if any(isinstance(n, ast.ImportFrom) and n.level
                       for n in ast.walk(ast.parse(path.read_text())))]
    assert not relative


def _private_imports(path: Path, modules: dict[str, Path], own: str) -> list[str]:
    """Private names (``_x``, not dunders) that ``path`` takes from another internal module:
    ``from m import _x``, or ``m._x`` on a name bound to an internal module."""
    tree = ast.parse(path.read_text())
    found, bound = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in modules and a.name != own:
                    bound[a.asname or a.name.split(".")[0]] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module in modules and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                if sub in modules:
                    bound[a.asname or a.name] = sub
                elif node.module != own and _is_private(a.name):
                    found.append(f"from {node.module} import {a.name}")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in bound and _is_private(node.attr)):
            found.append(f"{bound[node.value.id]}.{node.attr}")
    return found


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_module_imports_a_private_name_of_another(tmp_path):
    modules = _modules()
    offenders = {str(path.relative_to(REPO)): found for name, path in modules.items()
                 if (found := _private_imports(path, modules, name))}
    assert not offenders
    # The check itself, on a module that does both.
    probe = tmp_path / "probe.py"
    probe.write_text("from jaxllm.config import _x\nfrom jaxllm import layout\nlayout._y\n")
    assert _private_imports(probe, modules, "probe") == [
        "from jaxllm.config import _x", "jaxllm.layout._y"]


def test_at_most_five_modules_at_the_package_root():
    root = sorted(p.name for p in (REPO / "jaxllm").glob("*.py") if p.name != "__init__.py")
    assert len(root) <= MAX_ROOT_MODULES, root


def test_every_package_has_its_tests_folder():
    """tests/ mirrors the packages: each package with modules of its own has a folder of the
    same path with a test in it (``pallas_kernels/__init__.py`` only re-exports)."""
    missing = []
    for package in PACKAGES:
        for init in (REPO / package).rglob("__init__.py"):
            if not any(p.name != "__init__.py" for p in init.parent.glob("*.py")):
                continue
            folder = REPO / "tests" / init.parent.relative_to(REPO)
            if not any(folder.glob("test_*.py")):
                missing.append(str(folder.relative_to(REPO)))
    assert not missing, f"packages without tests: {missing}"


def test_no_module_over_600_lines():
    long = {str(p.relative_to(REPO)): n for p in _modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules: {long}"


def test_runtime_never_imports_test_only_packages_at_module_level():
    offenders = []
    for path in _modules().values():
        tree = ast.parse(path.read_text())
        # Statements run at import: the module body, and the bodies of its if/try blocks.
        body, top = list(tree.body), []
        while body:
            node = body.pop()
            if isinstance(node, ast.If | ast.Try):
                body += node.body + node.orelse + getattr(node, "finalbody", [])
                body += [s for h in getattr(node, "handlers", []) for s in h.body]
            else:
                top.append(node)
        for node in top:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names
                          if n.split(".")[0] in TEST_ONLY]
    assert not offenders, offenders
