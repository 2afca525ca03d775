"""Sphinx configuration of skdeep's documentation (``make docs``).

The build is offline: no intersphinx, no remote images, no fetched inventories. Names of
other projects (NumPy, PyTorch, scikit-learn, Dask, ...) therefore render as code text;
``nitpick_ignore_regex`` says so once below, and every reference to a skdeep name must
resolve (``nitpicky``, with warnings as errors).

Environment variables:

- ``SKDEEP_DOCS_RUN_EXAMPLES``: a regular expression of the example files the gallery
  runs (default ``/plot_``: only the quick ``examples/plot_*.py``). The other examples
  are shown with the pictures they drew into ``examples/images/`` when last run.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # the skdeep being documented, also from a fresh clone

from skdeep import __version__  # noqa: E402  (import skdeep is quick: names load lazily)


def _write_benchmark_pages() -> None:
    """Write one page per benchmark result file (``benchmarks/sync_docs.py``)."""
    spec = importlib.util.spec_from_file_location("sync_docs", ROOT / "benchmarks" / "sync_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    module.write_result_pages(ROOT)


_write_benchmark_pages()

project = "skdeep"
author = "the skdeep developers"
copyright = "2026, the skdeep developers"
version = release = __version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
templates_path = ["_templates"]
exclude_patterns = ["_build", "**.ipynb_checkpoints", "auto_examples/*.ipynb"]

# Every cross-reference to skdeep must resolve. Other projects' names are plain code
# text here (no intersphinx, the build is offline), so they are not looked up.
nitpicky = True
_OTHER_PROJECTS = (
    "numpy|np|torch|torchvision|sklearn|scipy|dask|distributed|dask_ml|zarr|timm|PIL"
    "|matplotlib|pandas|joblib|tqdm|pathlib|os|typing|collections"
)
nitpick_ignore_regex = [(r"py:.*", rf"({_OTHER_PROJECTS})(\..*)?")]

# autodoc / autosummary / numpydoc
autosummary_generate = True
autodoc_typehints = "none"  # the numpydoc sections say the types
autodoc_default_options = {"member-order": "bysource"}
numpydoc_show_class_members = False  # the class template lists the members
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False  # types are text: "array of shape (n, d)"
numpydoc_validation_checks: set[str] = set()

# MyST (Markdown pages)
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# sphinx-gallery: the examples in examples/ as a gallery
sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": os.environ.get("SKDEEP_DOCS_RUN_EXAMPLES", "/plot_"),
    "ignore_pattern": r"__init__\.py",
    "download_all_examples": False,
    "remove_config_comments": True,
    "abort_on_example_error": True,
    "show_memory": False,
    "write_computation_times": False,  # those pages load scripts from a CDN
    "min_reported_time": 1,
    "within_subsection_order": "FileNameSortKey",
}

# HTML
html_theme = "pydata_sphinx_theme"
html_title = f"skdeep {version}"
html_show_sourcelink = False
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "header_links_before_dropdown": 6,
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
