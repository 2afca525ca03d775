"""The README's benchmark figures are copies of the result files the benchmarks wrote."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_sync_readme():
    """Import ``benchmarks/sync_readme.py`` (the benchmarks folder is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "sync_readme", ROOT / "benchmarks" / "sync_readme.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sync_readme = load_sync_readme()


def test_every_benchmark_table_of_the_readme_is_its_result_files_table():
    """Each quoted table is, line for line, the result file's table with its columns."""
    readme = (ROOT / "README.md").read_text()
    assert readme.count("<!-- from benchmarks/results/") >= 4
    assert sync_readme.synced(readme) == readme


def write_result(root: Path, tables: list[list[str]]) -> None:
    """Write a result file ``benchmarks/results/run.md`` under ``root`` with ``tables``."""
    (root / "benchmarks" / "results").mkdir(parents=True)
    text = "# a result file\n\n" + "\n\n".join("\n".join(t) for t in tables) + "\n"
    (root / "benchmarks" / "results" / "run.md").write_text(text)


MARKER = "<!-- from benchmarks/results/run.md -->"
OTHER = ["| seeds | mean |", "|---|---|", "| 8 | 1.0 |"]


def test_sync_replaces_a_stale_table_by_the_one_with_the_same_columns(tmp_path):
    """The quoted table is replaced whole (rows added too), the text around it kept."""
    fresh = ["| method | accuracy |", "|---|---|", "| a | 92.0 |", "| b | 90.0 |"]
    write_result(tmp_path, [OTHER, fresh])
    readme = f"intro\n\n{MARKER}\n\n| method | accuracy |\n|---|---|\n| a | 91.0 |\n\nafter\n"
    result = sync_readme.synced(readme, tmp_path)
    assert result == f"intro\n\n{MARKER}\n\n" + "\n".join(fresh) + "\n\nafter\n"


def test_sync_refuses_when_the_columns_match_no_table(tmp_path):
    """A renamed column is an error naming the columns, not a silently kept old table."""
    write_result(tmp_path, [OTHER])
    readme = f"{MARKER}\n\n| method | accuracy |\n|---|---|\n| a | 91.0 |\n"
    with pytest.raises(ValueError, match=r"expected one table with the columns .* found 0"):
        sync_readme.synced(readme, tmp_path)
