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
    "rlhf": {"errors", "registry", "mapping", "checkpoint", "models", "layers", "runtime", "data", "convert",
             "training", "generation"},
}


def _imported_modules(path: Path) -> set[str]:
    """Dotted names under ``megatron_patch`` that ``path`` imports, relative imports resolved from its folder."""
    here = path.relative_to(ROOT.parent).with_suffix("").parts[:-1]  # ("megatron_patch", "rlhf", "ppo")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = (node.module or "").split(".") if node.level == 0 else \
                list(here[:len(here) - node.level + 1]) + [p for p in (node.module or "").split(".") if p]
            names = [".".join(base + [alias.name]) for alias in node.names] if not node.module else [".".join(base)]
            found.update(names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("megatron_patch.")}


def _imported_packages(path: Path, package: str) -> set[str]:
    return {name.split(".")[1] for name in _imported_modules(path)} - {package}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_lies_below_it(package):
    for path in sorted((ROOT / package).rglob("*.py")):
        wrong = _imported_packages(path, package) - ALLOWED[package]
        assert not wrong, f"{path.relative_to(ROOT.parent)} imports {sorted(wrong)}"


@pytest.mark.parametrize("leaf", ["errors.py", "registry.py"])
def test_leaf_modules_import_nothing_of_ours(leaf):
    for node in ast.walk(ast.parse((ROOT / leaf).read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("megatron_patch"), f"{leaf}: {node.module}"
        elif isinstance(node, ast.Import):
            assert not any(alias.name.startswith("megatron_patch") for alias in node.names), leaf
