"""rlhf/ by role: the RL math imports no other part of rlhf, the preference trainers do not import the RL loop, only
the examples import the examples, and imports sit at module top (a function-local import is a deliberate lazy seam,
listed here with its reason)."""

from __future__ import annotations

import ast

import pytest

from tests.test_layering import ROOT, _imported_modules

RLHF = ROOT / "rlhf"
P = "megatron_patch.rlhf."
# subpackage -> the rlhf modules / subpackages it may import (besides itself)
ARROWS = {
    "algos": set(),
    "preference": {"algos", "roles", "schedule_utils"},
    "ppo": {"algos", "preference", "roles", "schedule_utils"},
    "examples": {"algos", "preference", "ppo", "roles", "schedule_utils"},
}
LAZY = {"export.py": "reliability's checkpoint export keeps its own imports (edited by another change)"}


@pytest.mark.parametrize("sub", sorted(ARROWS))
def test_subpackage_arrows(sub):
    for path in sorted((RLHF / sub).rglob("*.py")):
        used = {name[len(P):].split(".")[0] for name in _imported_modules(path) if name.startswith(P)}
        wrong = used - ARROWS[sub] - {sub}
        assert not wrong, f"{path.relative_to(ROOT.parent)} imports rlhf {sorted(wrong)}"


def test_shared_modules_do_not_import_the_loops_or_examples():
    for path in sorted(RLHF.glob("*.py")):
        used = {name[len(P):].split(".")[0] for name in _imported_modules(path) if name.startswith(P)}
        assert not used & {"ppo", "examples"}, f"{path.name} imports {sorted(used & {'ppo', 'examples'})}"


def test_imports_at_module_top():
    for path in sorted(RLHF.rglob("*.py")):
        if path.name in LAZY:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
                assert not inner, f"{path.relative_to(ROOT.parent)}:{inner[0].lineno} imports inside {node.name}"
