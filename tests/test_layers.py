"""Layers point one way (STYLE.md, habit 12): cli and serve over export and runtime, both over
engines, engines over nothing of ours. Checked on the source, lazy imports inside
functions and string imports (importlib) included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> the sdrt packages it must never import
FORBIDDEN = {
    "engines": {"runtime", "export", "cli", "serve"},
    "runtime": {"export", "cli", "serve"},
    "export": {"cli", "serve"},
    # the server is a top layer over the runtime, like the CLI; it never needs torch
    "serve": {"export", "cli"},
    "cli": set(),
}


def _sdrt_imports(path: Path) -> set[str]:
    """The sdrt packages a module names in import statements or import strings."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("sdrt."):
            names = [node.value]
        found |= {n.split(".")[1] for n in names if n.startswith("sdrt.") and n.count(".") >= 1}
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_layer_never_imports_the_layers_above_it(package):
    wrong = {str(p.relative_to(ROOT)): sorted(_sdrt_imports(p) & FORBIDDEN[package])
             for p in sorted((ROOT / package).rglob("*.py"))}
    assert not {k: v for k, v in wrong.items() if v}, wrong
