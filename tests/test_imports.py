"""Tests of the package's structure: modules import downward only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

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


def run_python(code: str) -> str:
    """Run ``code`` in a fresh interpreter; return what it printed."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


HEAVY = ("torch", "torchvision", "sklearn", "dask", "distributed", "zarr", "timm", "matplotlib")


def test_import_skdeep_imports_nothing_heavy():
    """``import skdeep`` leaves torch, scikit-learn, Dask and zarr for when they are used."""
    loaded = run_python(f"import sys, skdeep; print([m for m in {HEAVY!r} if m in sys.modules])")
    assert loaded == "[]"


def test_every_public_name_is_listed_and_resolves():
    """``__all__`` and ``dir`` are complete; each name imports its module on first use."""
    import skdeep

    assert set(skdeep.__all__) <= set(dir(skdeep))
    for name in skdeep.__all__:
        assert getattr(skdeep, name) is not None, name
    assert skdeep.FeatureExtractor.__module__ == "skdeep.feature_extraction"
    with pytest.raises(AttributeError, match="has no attribute 'FeatureExtracter'"):
        skdeep.FeatureExtracter  # noqa: B018


def test_the_command_line_answers_help_and_cache_without_torch(tmp_path):
    """--help, extract --help and cache info do not import torch."""
    code = (
        "import sys\n"
        "from skdeep.__main__ import main\n"
        "for argv in (['--help'], ['extract', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"main(['cache', 'info', {str(tmp_path)!r}])\n"
        "print('torch' in sys.modules)\n"
    )
    assert run_python(code).splitlines()[-1] == "False"


def test_the_command_lines_poolings_are_the_libraries():
    """The command line lists skdeep's poolings without importing them (kept equal here)."""
    from skdeep.__main__ import POOLING_CHOICES
    from skdeep._layouts import POOLINGS

    assert POOLING_CHOICES == tuple("none" if p is None else p for p in POOLINGS)
