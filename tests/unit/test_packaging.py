"""What ``pip install xatm`` puts into site-packages: the package ``xatm`` and its
subpackages (the command is ``xatm.cli``), never tests, benchmarks or examples; and the
layers of the package import only downwards.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

from tests.support import ROOT

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

#: the layers, lowest first: a module may import its own layer and the ones below it
LAYERS = [
    "core",
    "participants",
    "log",
    "node",
    "recovery",
    "ops",
    "transactions",
    "integrations",
    "sagas",
    "coordinator",
]
#: the public modules (and the command) sit on top; errors is everyone's leaf
PUBLIC = {"admin", "aio", "events", "fastapi", "otel", "prometheus", "testing", "cli", "__main__"}


def test_only_xatm_is_installed() -> None:
    tool = PROJECT["tool"]["setuptools"]
    assert tool["packages"]["find"]["include"] == ["xatm", "xatm.*"]
    assert PROJECT["project"]["scripts"]["xatm"] == "xatm.cli.main:main"
    assert "package-dir" not in tool


def test_every_package_directory_is_a_package() -> None:
    for d in (ROOT / "xatm").rglob("*"):
        if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py")):
            assert (d / "__init__.py").is_file(), d


def layer_of(module: str) -> int:
    """The rank of an ``xatm.<pkg>...`` module (public modules rank above every layer)."""
    parts = module.split(".")
    if len(parts) < 2 or parts[1] == "errors":
        return -1
    if parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return len(LAYERS)


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "xatm":
                found.update(f"xatm.{a.name}" for a in node.names)
            elif node.module.startswith("xatm."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("xatm."))
    return found


def test_layers_import_only_downwards() -> None:
    wrong = []
    for path in sorted((ROOT / "xatm").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        own = layer_of(module)
        for target in imports_of(path):
            if layer_of(target) > own:
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_the_command_uses_the_public_api_only() -> None:
    """xatm.cli is built on xatm's public modules, like any application."""
    for path in sorted((ROOT / "xatm" / "cli").glob("*.py")):
        for target in imports_of(path):
            parts = target.split(".")
            assert parts[1] in PUBLIC | {"errors", "cli"} or len(parts) == 2, (
                f"{path.name}: {target}"
            )


def module_graph() -> dict[str, set[str]]:
    """Each xatm module -> the xatm modules it imports (typing-only imports included; ``from
    xatm.pkg import mod`` counts as importing the module ``xatm.pkg.mod``)."""
    modules = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / "xatm").rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for path in sorted((ROOT / "xatm").rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.startswith("xatm"):
                    subs = {f"{node.module}.{a.name}" for a in node.names} & modules
                    edges |= subs or ({node.module} & modules)
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names} & modules
        graph[name] = edges - {name}
    return graph


def test_no_import_circle() -> None:
    """Not even through imports made only for type checking."""
    graph = module_graph()
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                circles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []
