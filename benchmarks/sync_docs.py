"""Copy the benchmark tables quoted in the README from the result files that hold them.

Run:  .venv/bin/python benchmarks/sync_readme.py

A README table quoted from a result file sits under a marker line
``<!-- from benchmarks/results/<name>.md -->``. After a benchmark rewrites its result
file, this script replaces each quoted table with the table of that file whose header
names the same columns; it refuses (and changes nothing) when no table, or more than
one, has that header, as when a benchmark renamed a column: then copy that table by
hand. ``tests/test_readme.py`` checks that the README is what this script would write.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"<!-- from (benchmarks/results/[\w.]+\.md) -->")


def cells(line: str) -> tuple[str, ...]:
    """Return the stripped cells of a Markdown table row."""
    return tuple(cell.strip() for cell in line.strip().strip("|").split("|"))


def table_spans(lines: list[str]) -> list[range]:
    """Return the line ranges of the Markdown tables (runs of lines starting with '|')."""
    spans, start = [], None
    for index, line in enumerate([*lines, ""]):
        if line.startswith("|") and start is None:
            start = index
        elif not line.startswith("|") and start is not None:
            spans.append(range(start, index))
            start = None
    return spans


def synced(readme: str, root: Path = ROOT) -> str:
    """Return ``readme`` with each quoted table replaced by its result file's table."""
    lines = readme.splitlines()
    spans = table_spans(lines)
    replacements = {}
    for index, line in enumerate(lines):
        match = MARKER.search(line)
        if not match:
            continue
        quoted = next((span for span in spans if span.start > index), None)
        if quoted is None:
            raise ValueError(f"README line {index + 1}: no table follows the marker")
        source = (root / match[1]).read_text().splitlines()
        header = cells(lines[quoted.start])
        found = [span for span in table_spans(source) if cells(source[span.start]) == header]
        if len(found) != 1:
            raise ValueError(
                f"README line {index + 1}: expected one table with the columns {header} in "
                f"{match[1]}, found {len(found)}"
            )
        replacements[quoted.start] = (quoted, [source[i] for i in found[0]])
    out, index = [], 0
    while index < len(lines):
        if index in replacements:
            span, table = replacements[index]
            out.extend(table)
            index = span.stop
        else:
            out.append(lines[index])
            index += 1
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    path = ROOT / "README.md"
    before = path.read_text()
    after = synced(before)
    path.write_text(after)
    print("README.md updated" if after != before else "README.md already matches the results")
