"""The architecture the layout promises (STYLE.md), checked on the source with `ast`.

- Layers: `kernels <- v2d.geometry <- v2d <- slam <- tools`; a module never imports a higher layer,
  at module level or inside a function.
- Only `kernels/ops.py` imports the compiled extension `kernels._C`.
- No import cycle between the modules of `v2d`, counting every import (a cycle dodged by moving
  one import into a function is still a cycle: the two modules cannot be understood apart).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "v2d", "slam", "tools")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


EXTENSION = "kernels._C"  # compiled by setup.py; the check must not depend on it being built


def _is_module(name: str) -> bool:
    """A .py file or a package of the project, or its compiled extension."""
    path = ROOT.joinpath(*name.split("."))
    return name == EXTENSION or path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path, module: str) -> list[tuple[str, int]]:
    """(imported project module, line) for every import in `path`, module level or in a function."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" if _is_module(f"{base}.{alias.name}") else base for alias in node.names]
        else:
            continue
        found += [(name, node.lineno) for name in dict.fromkeys(names) if name.split(".")[0] in PACKAGES]
    return found


def _graph() -> dict[str, list[tuple[str, int]]]:
    graph = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            module = _module_name(path)
            graph[module] = _imports(path, module)
    return graph


GRAPH = _graph()
LAYERS = ("kernels", "v2d.geometry", "v2d", "slam", "tools")  # lowest first


def _layer(module: str) -> int:
    """Index in LAYERS of the most specific layer `module` belongs to (v2d.geometry.lie: v2d.geometry)."""
    layer = max((la for la in LAYERS if module == la or module.startswith(la + ".")), key=len)
    return LAYERS.index(layer)


def layer_violations(graph: dict[str, list[tuple[str, int]]]) -> list[str]:
    return [f"{src} (line {line}) imports {dst}: {LAYERS[_layer(src)]} may not import {LAYERS[_layer(dst)]}"
            for src, imports in graph.items() for dst, line in imports if _layer(dst) > _layer(src)]


def extension_importers(graph: dict[str, list[tuple[str, int]]]) -> list[str]:
    return [f"{src} (line {line})" for src, imports in graph.items() for dst, line in imports
            if dst == EXTENSION and src != "kernels.ops"]


def cycles(graph: dict[str, list[tuple[str, int]]], package: str) -> list[list[str]]:
    """The groups of modules of `package` that import each other (directly or through others)."""
    def inside(m: str) -> bool:
        return m == package or m.startswith(package + ".")

    edges = {m: {d for d, _ in imports if inside(d)} for m, imports in graph.items() if inside(m)}
    reach = {}
    for start in edges:  # modules reachable from `start` in one or more imports
        seen, todo = set(), list(edges[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += edges.get(m, ())
        reach[start] = seen
    groups = {tuple(sorted(n for n in reach[m] if m in reach.get(n, ()))) for m in edges if m in reach[m]}
    return sorted(list(g) for g in groups)


def test_every_package_is_parsed():
    assert {"kernels.ops", "v2d.config", "v2d.geometry.gauss_newton", "slam.run", "tools.cli"} <= set(GRAPH)


def test_layers_point_one_way():
    bad = layer_violations(GRAPH)
    assert not bad, "\n".join(bad)


def test_only_kernels_ops_imports_the_extension():
    assert any(dst == EXTENSION for dst, _ in GRAPH["kernels.ops"])  # the check sees the one import
    bad = extension_importers(GRAPH)
    assert not bad, "kernels._C imported outside kernels/ops.py: " + ", ".join(bad)


def test_no_import_cycle_in_v2d():
    found = cycles(GRAPH, "v2d")
    assert not found, "modules importing each other: " + "; ".join("{" + ", ".join(c) + "}" for c in found)


@pytest.mark.parametrize(
    ("module", "source", "check"),
    [
        ("v2d.geometry.lie", "def f():\n    from v2d.model import V2D\n", layer_violations),
        ("v2d.geometry.camera", "from v2d.errors import ShapeError\n", layer_violations),
        ("v2d.model", "import slam.run\n", layer_violations),
        ("slam.system", "from tools import cli\n", layer_violations),
        ("kernels.reference", "from v2d.geometry import lie\n", layer_violations),
        ("v2d.depth", "from kernels import _C\n", extension_importers),
        ("v2d.losses", "def f():\n    from v2d.train import Trainer\n", lambda g: cycles(g, "v2d")),
        ("v2d.io.datasets", "from . import results\n", lambda g: cycles(g, "v2d")),
    ],
)
def test_the_checks_catch_a_violation(tmp_path, module, source, check):
    """Each check fails when one bad import is added to the (clean) graph of the project."""
    path = ROOT.joinpath(*module.split(".")).with_suffix(".py")
    scratch = tmp_path / path.name
    scratch.write_text(source)
    graph = dict(GRAPH)
    graph[module] = GRAPH[module] + _imports(scratch, module)
    assert check(graph) != []
