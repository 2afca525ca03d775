"""The documentation: every public name has a page, every figure comes from a result file.

The README and the benchmark pages quote only what the benchmark scripts wrote into
``benchmarks/results/``; ``benchmarks/sync_docs.py`` copies the quoted tables, and these
tests check its output and its rules. The Sphinx build itself runs in CI (``make docs``).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PUBLIC_MODULES = ["skdeep", "skdeep.backbones", "skdeep.dask", "skdeep.datasets"]
PUBLIC_MODULES += ["skdeep.losses", "skdeep.metrics"]


def load_sync_docs():
    """Import ``benchmarks/sync_docs.py`` (the benchmarks folder is not a package)."""
    spec = importlib.util.spec_from_file_location("sync_docs", ROOT / "benchmarks" / "sync_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


sync_docs = load_sync_docs()


# Every public name has a reference page -------------------------------------------------


def public_names() -> set[str]:
    """Fully qualified public names: ``__all__``, else the functions and classes defined."""
    names = set()
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        if hasattr(module, "__all__"):
            listed = module.__all__
        else:
            listed = [
                name
                for name, value in vars(module).items()
                if not name.startswith("_")
                and (inspect.isfunction(value) or inspect.isclass(value))
                and value.__module__ == module_name
            ]
        for name in listed:
            value = getattr(module, name)
            if not name.startswith("__") and not inspect.ismodule(value):
                names.add(f"{module_name}.{name}")
    return names


def documented_names() -> set[str]:
    """Return the names that ``docs/api.rst`` lists in its autosummary tables."""
    documented, module, inside = set(), "", False
    for line in (DOCS / "api.rst").read_text().splitlines():
        if match := re.match(r"\.\. currentmodule:: (\S+)", line):
            module = match[1]
        elif line.startswith(".. autosummary::"):
            inside = True
        elif inside and line.strip() and not line.startswith("   "):
            inside = False
        elif inside and (match := re.match(r"   ([A-Za-z_][\w.]*)$", line)):
            documented.add(f"{module}.{match[1]}")
    return documented


def test_every_public_name_has_a_reference_page():
    """A public name missing from docs/api.rst would have no page in the API reference."""
    missing = sorted(public_names() - documented_names())
    assert not missing, f"add these to docs/api.rst: {missing}"


def test_every_documented_name_exists():
    """Each line of the API reference names an object that exists (no stale entries)."""
    for name in sorted(documented_names()):
        module_name, _, attribute = name.rpartition(".")
        while module_name not in sys.modules and "." in module_name:
            try:
                importlib.import_module(module_name)
                break
            except ModuleNotFoundError:
                module_name, _, prefix = module_name.rpartition(".")
                attribute = f"{prefix}.{attribute}"
        value = importlib.import_module(module_name)
        for part in attribute.split("."):
            value = getattr(value, part)


def test_the_api_reference_generates_a_page_per_name():
    """Each autosummary table writes pages (:toctree:) through one of the templates."""
    text = (DOCS / "api.rst").read_text()
    tables = text.count(".. autosummary::")
    assert text.count(":toctree: generated/") == tables
    templates = re.findall(r":template: (\S+)", text)
    assert len(templates) == tables
    assert all((DOCS / "_templates" / name).exists() for name in templates)


# Benchmark figures come from the result files ---------------------------------------------


def test_every_quoted_table_is_its_result_files_table():
    """Each quoted table (and its caption) is what sync_docs.py copies from its file."""
    pages = [page for page in sync_docs.quoting_pages() if page.exists()]
    quoted = 0
    for page in pages:
        text = page.read_text()
        quoted += text.count("<!-- from benchmarks/results/")
        assert sync_docs.synced(text, ROOT, page.name) == text, (
            f"{page.relative_to(ROOT)} is stale: run .venv/bin/python benchmarks/sync_docs.py"
        )
    assert quoted >= 20


def test_every_quoted_table_names_its_machine():
    """The caption of every quoted table names the CPU and the GPU of its result file."""
    for page in sorted((ROOT / sync_docs.PAGES).glob("*.md")):
        lines = page.read_text().splitlines()
        for index, line in enumerate(lines):
            if sync_docs.MARKER.search(line):
                caption = lines[index + 2]
                assert caption.startswith(sync_docs.CAPTION), (page.name, index)
                assert "; CPU: " in caption and "; GPU: " in caption, caption


def write_result(root: Path, tables: list[list[str]], name: str = "run") -> None:
    """Write a result file ``benchmarks/results/<name>.md`` under ``root``."""
    folder = root / "benchmarks" / "results"
    folder.mkdir(parents=True, exist_ok=True)
    header = "# run\n\n- date: 2026-12-05 10:00 UTC\n- CPU: Some CPU, 2 torch threads\n"
    header += "- GPU: none used\n"
    sections = [f"## Section {i}\n\n" + "\n".join(table) for i, table in enumerate(tables)]
    (folder / f"{name}.md").write_text(header + "\n" + "\n\n".join(sections) + "\n")


MARKER = "<!-- from benchmarks/results/run.md -->"
OTHER = ["| seeds | mean |", "|---|---|", "| 8 | 1.0 |"]


def test_sync_replaces_a_stale_table_and_caption_by_the_ones_with_the_same_columns(tmp_path):
    """The quoted table is replaced whole (rows added too), the text around it kept."""
    fresh = ["| method | accuracy |", "|---|---|", "| a | 92.0 |", "| b | 90.0 |"]
    write_result(tmp_path, [OTHER, fresh])
    page = f"intro\n\n{MARKER}\n\n| method | accuracy |\n|---|---|\n| a | 91.0 |\n\nafter\n"
    caption = (
        "*Table:* Section 1. From `benchmarks/results/run.md`, written 2026-12-05 10:00 UTC; "
        "CPU: Some CPU, 2 torch threads; GPU: none used."
    )
    expected = f"intro\n\n{MARKER}\n\n{caption}\n\n" + "\n".join(fresh) + "\n\nafter\n"
    assert sync_docs.synced(page, tmp_path) == expected
    assert sync_docs.synced(expected, tmp_path) == expected  # a second run changes nothing


def test_sync_refuses_when_the_columns_match_no_table(tmp_path):
    """A renamed column is an error naming the columns, not a silently kept old table."""
    write_result(tmp_path, [OTHER])
    page = f"{MARKER}\n\n| method | accuracy |\n|---|---|\n| a | 91.0 |\n"
    with pytest.raises(ValueError, match=r"expected one table with the columns .* found 0"):
        sync_docs.synced(page, tmp_path)


def test_every_result_file_gets_a_page_and_removed_files_lose_theirs(tmp_path):
    """A new result file appears in the benchmark pages with no other change."""
    write_result(tmp_path, [OTHER], "first")
    write_result(tmp_path, [OTHER], "second")
    write_result(tmp_path, [OTHER], "second_quick")  # a smoke run: not a result
    sync_docs.write_result_pages(tmp_path)
    folder = tmp_path / sync_docs.GENERATED
    assert sorted(p.name for p in folder.glob("*.md")) == ["first.md", "second.md"]
    page = (folder / "second.md").read_text()
    assert "- CPU: Some CPU, 2 torch threads" in page and "| 8 | 1.0 |" in page
    (tmp_path / "benchmarks" / "results" / "first.md").unlink()
    sync_docs.write_result_pages(tmp_path)
    assert sorted(p.name for p in folder.glob("*.md")) == ["second.md"]


def test_every_result_file_has_a_machine_line():
    """Each result file names its date, CPU and GPU, which its page and captions show."""
    for path in sync_docs.result_files():
        fields = sync_docs.ResultFile.read(path).fields
        assert {"date", "CPU", "GPU"} <= set(fields), path.name


# The README is a landing page ---------------------------------------------------------------

README = (ROOT / "README.md").read_text()
NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def numbers(text: str) -> set[str]:
    """Return the numbers written in ``text``, without thousands separators."""
    return {match.replace(",", "") for match in NUMBER.findall(text)}


def headline_lines() -> list[str]:
    """Return the bullets of the README's 'What it measures' section, one line each."""
    section = README.split("## What it measures", 1)[1].split("\n## ", 1)[0]
    return [" ".join(item.split()) for item in re.split(r"\n- ", section)[1:]]


def test_the_readme_is_a_landing_page():
    """At most about 250 lines, with the two commands and links into the documentation."""
    assert len(README.splitlines()) <= 250
    assert "make demo" in README and "make test" in README
    for estimator in ["FeatureExtractor", "FineTuneClassifier", "DomainAdaptedClassifier"]:
        assert f"### {estimator}" in README
    assert README.count("![") == 1  # one picture
    assert "<!-- from benchmarks/results/" not in README  # full tables live in the docs


def test_every_headline_figure_comes_from_the_result_files_its_table_quotes():
    """Each number of a headline line appears in a result file its linked page quotes."""
    lines = headline_lines()
    assert len(lines) >= 4
    for line in lines:
        links = re.findall(r"\]\((docs/benchmarks/[\w/]+\.md)\)", line)
        assert len(links) == 1, f"one link to its benchmark page: {line}"
        page = (ROOT / links[0]).read_text()
        files = set(sync_docs.MARKER.findall(page))
        assert files, f"{links[0]} quotes no result file"
        written = set().union(*(numbers((ROOT / name).read_text()) for name in files))
        text = re.sub(r"\]\([^)]*\)", "]", line)  # not the link's own path
        stale = numbers(text) - written
        assert not stale, f"{sorted(stale)} of '{line}' are in none of {sorted(files)}"


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize(
    "page",
    [ROOT / "README.md", *sorted(DOCS.glob("*.md")), *sorted(DOCS.glob("*/*.md"))],
    ids=lambda path: str(path.relative_to(ROOT)),
)
def test_relative_links_lead_to_files(page):
    """README links into docs/ and examples/, and page-to-page links, find their file."""
    for target in LINK.findall(page.read_text()):
        if "://" in target:
            continue
        assert (page.parent / target).exists(), f"{page.name}: {target} does not exist"


# The examples form the gallery ----------------------------------------------------------------


@pytest.mark.parametrize(
    "example", sorted((ROOT / "examples").glob("*.py")), ids=lambda path: path.name
)
def test_every_example_opens_with_a_gallery_title(example):
    """sphinx-gallery's form: a docstring whose first line is a title, underlined."""
    lines = example.read_text().splitlines()
    assert lines[0] == '"""' and lines[1].strip() and set(lines[2]) == {"="}, example.name
    assert len(lines[2]) >= len(lines[1])


def test_the_docs_build_runs_a_quick_example():
    """At least one example matches the gallery's default pattern (examples/plot_*.py)."""
    assert list((ROOT / "examples").glob("plot_*.py"))
    conf = (DOCS / "conf.py").read_text()
    assert '"SKDEEP_DOCS_RUN_EXAMPLES", "/plot_"' in conf


# The package -----------------------------------------------------------------------------------


def test_the_version_has_one_source():
    """pyproject.toml reads the version from skdeep/_version.py, as the docs do."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject
    assert 'version = { attr = "skdeep._version.__version__" }' in pyproject
    assert "from skdeep import __version__" in (DOCS / "conf.py").read_text()
    found = [
        path.relative_to(ROOT).as_posix()
        for path in [*ROOT.glob("*.toml"), *ROOT.glob("*.cfg"), *(ROOT / "skdeep").glob("*.py")]
        if re.search(r"""version\s*=\s*["']\d""", path.read_text())
    ]
    assert found == [], f"a version written outside skdeep/_version.py: {found}"


def test_the_wheel_ships_py_typed():
    """The marker file exists and is declared package data.

    ``MANIFEST.in`` grafts ``skdeep/`` too; ``tools/check_dist.py`` (``make dist-check``)
    checks the outcome: the wheel holds ``skdeep/py.typed``.
    """
    assert (ROOT / "skdeep" / "py.typed").exists()
    assert 'skdeep = ["py.typed"]' in (ROOT / "pyproject.toml").read_text()
