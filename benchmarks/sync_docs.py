"""Make the documentation's benchmark pages from the result files the benchmarks wrote.

Run:  .venv/bin/python benchmarks/sync_docs.py     (``make docs`` runs it first)

Every figure of the benchmark pages comes from a file under ``benchmarks/results/``
that a benchmark script wrote. This script does two things:

1. It writes one page per result file, ``docs/benchmarks/results/<name>.md``: the
   machine the file names (date, command, CPU and instruction sets, GPU, versions),
   then every section of the file with its tables. A new result file gets its page on
   the next run; the pages of removed files are removed. These pages are build
   products (not committed).
2. It copies the tables that the written pages (``docs/benchmarks/*.md``, and the
   README if it has any) quote. A quoted table sits under a marker line
   ``<!-- from benchmarks/results/<name>.md -->``, followed by a caption line (the
   result file's section title, date, CPU and GPU) and the table. The script replaces
   the caption and the table with those of the section of that file whose table header
   names the same columns; it refuses, changing nothing, when no table or more than one
   has that header (as when a benchmark renamed a column: then fix the page by hand).
   ``tests/test_docs.py`` checks that the written pages are what this script writes.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path("benchmarks") / "results"
PAGES = Path("docs") / "benchmarks"
GENERATED = PAGES / "results"
MARKER = re.compile(r"<!-- from (benchmarks/results/[\w.]+\.md) -->")
CAPTION = "*Table:*"
# Files written by --quick smoke runs (ignored by git) are not results.
QUICK = re.compile(r"_quick\.md$")


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


@dataclass
class ResultFile:
    """A result file: its header fields and its sections (title, lines)."""

    name: str
    title: str
    fields: dict[str, str]
    preamble: list[str]
    sections: list[tuple[str, list[str]]]

    @classmethod
    def read(cls, path: Path) -> ResultFile:
        """Parse ``path``: a '# name' title, '- key: value' fields, then '## ' sections."""
        lines = path.read_text().splitlines()
        title = lines[0].removeprefix("# ").strip() if lines else path.stem
        fields, preamble, sections = {}, [], []
        for line in lines[1:]:
            if line.startswith("## "):
                sections.append((line[3:].strip(), []))
            elif sections:
                sections[-1][1].append(line)
            elif re.match(r"- [\w ]+: ", line) and not preamble:
                key, value = line[2:].split(": ", 1)
                fields[key.strip()] = value.strip()
            elif line.strip() or preamble:
                preamble.append(line)
        return cls(path.stem, title, fields, preamble, sections)

    def machine(self) -> str:
        """Return the date, CPU and GPU the file names, on one line."""
        return (
            f"written {self.fields.get('date', 'on an unrecorded date')}; "
            f"CPU: {self.fields.get('CPU', 'not recorded')}; "
            f"GPU: {self.fields.get('GPU', 'not recorded')}"
        )

    def tables_with_header(self, header: tuple[str, ...]) -> list[tuple[str, list[str]]]:
        """Return (section title, table lines) of every table whose header is ``header``."""
        found = []
        for title, lines in self.sections:
            for span in table_spans(lines):
                if cells(lines[span.start]) == header:
                    found.append((title, [lines[i] for i in span]))
        return found


def result_files(root: Path = ROOT) -> list[Path]:
    """Return the result files under ``root``, sorted by name (smoke runs left out)."""
    return sorted(p for p in (root / RESULTS).glob("*.md") if not QUICK.search(p.name))


def caption(result: ResultFile, title: str, source: str) -> str:
    """Return the line that says where a quoted table comes from and where it ran."""
    return f"{CAPTION} {title}. From `{source}`, {result.machine()}."


def synced(page: str, root: Path = ROOT, name: str = "page") -> str:
    """Return ``page`` with each quoted table (and its caption) copied from its file."""
    lines = page.splitlines()
    spans = table_spans(lines)
    replacements: dict[int, tuple[int, list[str]]] = {}
    for index, line in enumerate(lines):
        match = MARKER.search(line)
        if not match:
            continue
        quoted = next((span for span in spans if span.start > index), None)
        if quoted is None:
            raise ValueError(f"{name} line {index + 1}: no table follows the marker")
        between = [i for i in range(index + 1, quoted.start) if lines[i].strip()]
        if any(not lines[i].startswith(CAPTION) for i in between):
            raise ValueError(
                f"{name} line {index + 1}: only a caption line may stand between the "
                "marker and its table"
            )
        result = ResultFile.read(root / match[1])
        header = cells(lines[quoted.start])
        found = result.tables_with_header(header)
        if len(found) != 1:
            raise ValueError(
                f"{name} line {index + 1}: expected one table with the columns {header} in "
                f"{match[1]}, found {len(found)}"
            )
        title, table = found[0]
        block = ["", caption(result, title, match[1]), "", *table]
        replacements[index + 1] = (quoted.stop, block)
    out, index = [], 0
    while index < len(lines):
        if index in replacements:
            stop, block = replacements[index]
            out.extend(block)
            index = stop
        else:
            out.append(lines[index])
            index += 1
    return "\n".join(out) + "\n"


def quoting_pages(root: Path = ROOT) -> list[Path]:
    """Return the written pages that may quote tables: benchmark pages and README."""
    return [*sorted((root / PAGES).glob("*.md")), root / "README.md"]


def result_page(path: Path, root: Path = ROOT) -> str:
    """Return the documentation page of one result file."""
    result = ResultFile.read(path)
    source = path.relative_to(root).as_posix()
    title = f"Result file `{result.name}`"
    out = [
        f"# {title}",
        "",
        f"Written by a benchmark script into `{source}`; this page is made from it by "
        "`benchmarks/sync_docs.py`, unchanged but for these lines.",
        "",
    ]
    out += [f"- {key}: {value}" for key, value in result.fields.items()]
    out += ["", *result.preamble] if result.preamble else []
    for section, lines in result.sections:
        out += ["", f"## {section}", "", *lines]
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"


def write_result_pages(root: Path = ROOT) -> list[Path]:
    """Write ``docs/benchmarks/results/<name>.md`` for every result file; drop stale ones."""
    folder = root / GENERATED
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for path in result_files(root):
        page = folder / f"{path.stem}.md"
        text = result_page(path, root)
        if not page.exists() or page.read_text() != text:
            page.write_text(text)
        written.append(page)
    for page in folder.glob("*.md"):
        if page not in written:
            page.unlink()
    return written


def main(argv: list[str]) -> int:
    """Write the result pages and sync the quoted tables (``--check``: only compare)."""
    check = "--check" in argv
    stale = []
    for path in quoting_pages():
        if not path.exists():
            continue
        before = path.read_text()
        after = synced(before, ROOT, path.relative_to(ROOT).as_posix())
        if after != before:
            stale.append(path.relative_to(ROOT).as_posix())
            if not check:
                path.write_text(after)
    if check:
        print("stale: " + ", ".join(stale) if stale else "every quoted table matches")
        return 1 if stale else 0
    pages = write_result_pages()
    print(f"{len(pages)} result pages in {GENERATED}; updated: {', '.join(stale) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
