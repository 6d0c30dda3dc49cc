"""The package's shape is a test: one-way layers (import-linter), no cycles, no private names across
modules, a root that holds only the public API and the errors, readable function and module sizes."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "lorasynth"
LINT = Path(sys.executable).with_name("lint-imports")
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 600


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_layer_contracts_hold():
    out = _lint(REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "2 kept, 0 broken" in out.stdout


@pytest.mark.parametrize("importer, imported", [
    ("core/sd15.py", "lorasynth.apps.cli.main"),          # the lowest layer reaching the top
    ("formats/keys.py", "lorasynth.library.store"),       # a format reading the library
    ("models/latent/pca.py", "lorasynth.training.lightning"),  # inference path pulling in Lightning
    ("faces/images.py", "lorasynth.runtime.pipeline"),    # two independent siblings
])
def test_the_contract_fails_when_a_lower_layer_imports_a_higher_one(tmp_path, importer, imported):
    """A mutation check of the contract itself: the same tree with one upward import must fail."""
    shutil.copytree(PACKAGE, tmp_path / "lorasynth", ignore=shutil.ignore_patterns("__pycache__", "static", "workflows"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "lorasynth" / importer
    target.write_text(target.read_text() + f"\n\ndef _upward():\n    import {imported}  # noqa\n")
    out = _lint(tmp_path)
    assert out.returncode != 0 and "BROKEN" in out.stdout, out.stdout[-2000:]


def test_the_package_root_holds_only_the_api_the_errors_and_layers():
    files = {p.name for p in PACKAGE.iterdir() if p.is_file() and p.suffix == ".py"}
    assert files == {"__init__.py", "errors.py"}
    layers = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert layers == {"core", "formats", "faces", "library", "runtime", "models", "training", "synthesis", "worlds",
                      "apps", "data"}


def _private_imports(path: Path) -> list[str]:
    """``from lorasynth.x import _name`` and ``lorasynth.x._name`` uses of another module's private names."""
    me = _module_name(path)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lorasynth") and node.module != me:
            bad += [f"{me}: from {node.module} import {a.name}" for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")]
    return bad


def test_no_private_name_is_used_outside_its_module():
    bad = [line for path in _modules() for line in _private_imports(path)]
    tests = [p for p in (REPO / "tests").rglob("*.py") if "__pycache__" not in p.parts]
    bad += [line for path in tests for line in _private_imports(path)]
    assert bad == []


def _long_functions(path: Path) -> list[str]:
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            body = "\n".join(lines[node.lineno - 1 : node.end_lineno])
            if length > MAX_FUNCTION_LINES and "# long:" not in body:
                out.append(f"{_module_name(path)}.{node.name}: {length} lines")
    return out


def test_functions_are_short_enough_to_hold_in_mind():
    """Over 80 lines only with a ``# long: why`` comment inside the function."""
    assert [f for path in _modules() for f in _long_functions(path)] == []


def test_modules_over_600_lines_say_why():
    """A module over 600 lines usually holds two jobs: split it, or say why not (``# size: why``)."""
    big = [f"{_module_name(p)}: {n} lines" for p in _modules()
           if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
           and "# size:" not in p.read_text(encoding="utf-8")]
    assert big == []
