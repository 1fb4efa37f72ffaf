"""What ``pip install xatm`` puts into site-packages: xatm, xatm.testing and the command's
code under an import name of xatm's own (``xatm_cli``, from the folder ``cli/``), never a
top-level package named ``cli``. Checked from pyproject.toml and the sources (building a
wheel would need the network); docs/operations.md has the manual check with a scratch venv.
"""

from __future__ import annotations

import ast
import re
import tomllib

from tests.support import ROOT

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_no_top_level_cli_package_is_installed() -> None:
    tool = PROJECT["tool"]["setuptools"]
    assert "find" not in tool.get("packages", {}), "package discovery would pick up cli/"
    packages = set(tool["packages"])
    assert packages == {"xatm", "xatm.testing", "xatm_cli"}
    assert not any(p == "cli" or p.startswith("cli.") for p in packages)
    assert tool["package-dir"] == {"xatm_cli": "cli"}
    assert PROJECT["project"]["scripts"]["xatm"] == "xatm_cli.main:main"
    # every package directory that exists in the source tree is listed
    listed = {ROOT / tool["package-dir"].get(p, p.replace(".", "/")) for p in packages}
    assert all((d / "__init__.py").is_file() for d in listed)


def test_the_command_imports_itself_relatively() -> None:
    """Installed as xatm_cli, an absolute ``import cli...`` would fail (or find another
    project's ``cli``)."""
    for path in sorted((ROOT / "cli").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                assert node.module.split(".")[0] != "cli", f"{path.name}: from {node.module}"
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] != "cli" for a in node.names), path.name
        assert '"-m", "cli.' not in path.read_text(), f"{path.name} runs cli.* by name"


def test_license_is_an_spdx_expression() -> None:
    assert PROJECT["project"]["license"] == "Apache-2.0"
    (requirement,) = PROJECT["build-system"]["requires"]
    match = re.fullmatch(r"setuptools>=(\d+)", requirement)
    assert match is not None and int(match.group(1)) >= 77  # SPDX license strings: >= 77
