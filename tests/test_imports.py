"""Tests of the package's structure: modules import downward only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "skdeep"


def internal_imports(path: Path) -> set[str]:
    """Names of the skdeep modules that ``path`` imports, at the top or inside functions."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                imported.add(node.module.split(".")[0])
            else:
                imported.update(alias.name for alias in node.names)
    return imported


def test_no_module_imports_itself_back():
    """The graph of internal imports has no cycle (lazy imports included)."""
    graph = {path.stem: internal_imports(path) for path in PACKAGE.glob("*.py")}
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", f"import cycle: {' -> '.join([*trail, module])}"
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            visit(target, [*trail, module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])
    assert "backbones" not in graph["_timm"] and "backbones" not in graph["_weights"]


def test_the_core_extractor_does_not_import_the_scale_out_module():
    """FeatureExtractor works without skdeep.dask (imported only for Dask arrays)."""
    code = "import sys, skdeep.feature_extraction; print('skdeep.dask' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr
