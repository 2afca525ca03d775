"""The README's benchmark figures are copies of the result files the benchmarks wrote."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"<!-- from (benchmarks/results/[\w.]+\.md) -->")


def quoted_tables(readme: str) -> list[tuple[str, list[str]]]:
    """Return (result file, table lines) for each table the README marks as quoted."""
    quotes, lines = [], readme.splitlines()
    for index, line in enumerate(lines):
        match = MARKER.search(line)
        if match:
            table = []
            for following in lines[index + 1 :]:
                if not following.startswith("|"):
                    if table:
                        break
                    continue
                table.append(following)
            quotes.append((match[1], table))
    return quotes


def test_every_benchmark_table_of_the_readme_comes_from_a_result_file():
    """Each quoted table is in its result file, line for line."""
    quotes = quoted_tables((ROOT / "README.md").read_text())
    assert len(quotes) >= 4
    for source, table in quotes:
        text = (ROOT / source).read_text()
        assert table, source
        for line in table:
            assert line in text, f"{source} does not hold: {line}"
