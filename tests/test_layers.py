"""The package layout: one import namespace, and layers that only point down.

Layers (see ``aimass/__init__.py``): 0 the foundation ``aimass.core``; 1 the stages
``aimass.streams`` / ``agents`` / ``models`` / ``rules``; 2 the commands, the modules directly in
``aimass``. An AST walk finds every import, top-level or inside a function.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# folder in the repository -> its package in the namespace (setup.cfg package_dir)
PACKAGE_DIRS = {"aimass": "aimass", "streams": "aimass.streams", "agents": "aimass.agents",
                "models": "aimass.models", "rules": "aimass.rules"}
STAGES = ("aimass.streams", "aimass.agents", "aimass.models", "aimass.rules")
LAYER_NAMES = ("foundation", "stage", "command")


def layer(module: str) -> int | None:
    """0 foundation, 1 stage, 2 command; None for anything outside the namespace."""
    if module == "aimass.core" or module.startswith("aimass.core."):
        return 0
    if any(module == s or module.startswith(s + ".") for s in STAGES):
        return 1
    if module.startswith("aimass."):
        return 2
    return None


def modules() -> dict[str, Path]:
    """Every module of the namespace, by its dotted name."""
    found = {}
    for folder, package in PACKAGE_DIRS.items():
        for path in (REPO / folder).rglob("*.py"):
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def imported_names(source: str, module: str) -> list[tuple[int, str]]:
    """(line, module) of every import in ``source``, relative imports resolved against ``module``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(module.split(".")[:-node.level] + ([base] if base else []))
            out.append((node.lineno, base))
            # `from aimass.core import contract` imports the module aimass.core.contract
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names if layer(f"{base}.{a.name}") is not None]
    return out


def layer_violations(module: str, source: str) -> list[str]:
    """Imports of ``module`` that point to a higher layer, or to a name outside the namespace
    that only resolves from the repository root (the old top-level packages)."""
    own = layer(module)
    bad = []
    for line, name in imported_names(source, module):
        top = name.split(".")[0]
        if top in ("streams", "agents", "models", "rules"):
            bad.append(f"{module}:{line} imports {name}: use aimass.{name}")
        elif (target := layer(name)) is not None and target > own:
            bad.append(f"{module}:{line} ({LAYER_NAMES[own]}) imports {name} ({LAYER_NAMES[target]})")
    return bad


def test_no_module_imports_a_higher_layer():
    found = modules()
    assert len(found) > 50 and {"aimass.core.config", "aimass.streams.bridge", "aimass.cli"} <= set(found)
    bad = [v for name, path in sorted(found.items()) for v in layer_violations(name, path.read_text())]
    assert bad == []


@pytest.mark.parametrize("module, source, expected", [
    ("aimass.core.stack", "from aimass.streams import kafka\n", "(foundation) imports aimass.streams.kafka (stage)"),
    ("aimass.core.db", "def f():\n    import aimass.demo\n", "(foundation) imports aimass.demo (command)"),
    ("aimass.rules.engine", "from aimass.query import run\n", "(stage) imports aimass.query (command)"),
    ("aimass.agents.sink", "from ..query import run\n", "(stage) imports aimass.query (command)"),
    ("aimass.agents.sink", "from streams import kafka\n", "imports streams: use aimass.streams"),
])
def test_the_check_catches_upward_and_old_style_imports(module, source, expected):
    assert any(expected in v for v in layer_violations(module, source))


@pytest.mark.parametrize("module, source", [
    ("aimass.agents.sink", "from aimass.core import contract\nfrom aimass.streams.kafka import producer_config\n"),
    ("aimass.cli", "from aimass.agents import sink\nimport aimass.core.config\n"),
    ("aimass.core.db", "from aimass.core.clickhouse import Store\nimport numpy\n"),
])
def test_the_check_allows_downward_and_sideways_imports(module, source):
    assert layer_violations(module, source) == []


def test_wheel_adds_one_top_level_name(tmp_path):
    """Build the wheel, install it into a fresh venv and list what it added to site-packages."""
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist), str(REPO)], check=True, capture_output=True, timeout=300)
    wheel, = dist.glob("aimass-*.whl")
    env_dir = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    before = set(os.listdir(site))
    # The build venv's pip installs into the fresh venv (which has no pip of its own).
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    added = set(os.listdir(site)) - before
    assert {a for a in added if not a.endswith(".dist-info")} == {"aimass"}
    for package in ("core", "streams", "agents", "models", "rules"):
        assert (site / "aimass" / package / "__init__.py").is_file(), package
    # The foundation's configuration needs nothing outside the standard library: importable as installed.
    out = subprocess.run([str(python), "-I", "-c", "import aimass.core.config as c, aimass.streams as s; "
                          "print(c.__file__); print(s.__file__)"], check=True, capture_output=True, text=True)
    assert all(line.startswith(str(site)) for line in out.stdout.split())
    assert (env_dir / "bin" / "aimass").is_file()
