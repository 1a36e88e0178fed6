"""The arrows of DESIGN.md go one way: a package imports only the packages below it (read from the source, lazy
imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "megatron_patch"

# package -> the megatron_patch packages / modules it may import (besides itself).
ALLOWED = {
    "mapping": {"errors"},
    "layers": {"errors"},  # additions to megatron-core modules (LoRA, ALiBi, NormHead, ...): nothing of ours above
    "checkpoint": {"errors", "registry", "mapping"},
    "models": {"errors", "registry", "mapping", "checkpoint", "layers", "runtime", "data"},
    "convert": {"errors", "registry", "mapping", "checkpoint", "models", "layers", "runtime", "data"},
}


def _imported_packages(path: Path, package: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] == "megatron_patch" and len(parts) > 1:
                    found.add(parts[1])
            elif node.level == 1:
                continue  # the same package
            elif node.level == 2:
                target = (node.module or "").split(".")[0]
                found.update([target] if target else [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "megatron_patch" and len(parts) > 1:
                    found.add(parts[1])
    return found - {package}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_lies_below_it(package):
    for path in sorted((ROOT / package).glob("*.py")):
        wrong = _imported_packages(path, package) - ALLOWED[package]
        assert not wrong, f"{path.relative_to(ROOT.parent)} imports {sorted(wrong)}"


@pytest.mark.parametrize("leaf", ["errors.py", "registry.py"])
def test_leaf_modules_import_nothing_of_ours(leaf):
    for node in ast.walk(ast.parse((ROOT / leaf).read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("megatron_patch"), f"{leaf}: {node.module}"
        elif isinstance(node, ast.Import):
            assert not any(alias.name.startswith("megatron_patch") for alias in node.names), leaf
