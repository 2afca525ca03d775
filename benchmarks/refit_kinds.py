"""Refit the ``kinds`` section's records of older code, to see that they reproduce.

Run:  .venv/bin/python benchmarks/refit_kinds.py
      (``ONEDNN_MAX_CPU_ISA=AVX2`` before it checks the AVX2-capped kind's records)

The ``kinds`` section of ``bench_domain_adaptation.py`` pairs fits that several commits
made (each record names its commit and a digest of skdeep's files as they were). A
pair is fair only if the older fit is what today's code would give. For each code
version in the records of this kind of machine:

- a committed version whose code is today's once docstrings are set aside (the
  record's digest matches the commit's files, and the commit's syntax trees without
  docstrings equal the working tree's) is the same code: nothing to refit;
- any other version (older code, or files that were never committed) has its fastest
  record refitted with today's code, and the target accuracy compared with the record.

Writes ``results/domain_adaptation_refit.{jsonl,md}`` (the jsonl keeps every refit, of
every kind, so that a second run only rewrites the table); about 25 minutes per kind
on 2 cores here.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
from _common import RESULTS, Report
from bench_domain_adaptation import (
    DIGITS,
    MNIST_M,
    SMALL,
    THREADS,
    Records,
    code_version,
    digits_task,
    kind_arms,
    machine_kind,
    mnist_m_task,
)

from skdeep._device import resolve_device

ROOT = Path(__file__).resolve().parent.parent
REFITS = RESULTS / "domain_adaptation_refit.jsonl"


def code_without_docstrings(sources: dict[str, str]) -> str:
    """Digest the syntax trees of skdeep's files (path -> source), docstrings removed."""
    digest = hashlib.sha256()
    for path in sorted(sources):
        tree = ast.parse(sources[path])
        for node in ast.walk(tree):
            scopes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
            body = getattr(node, "body", None)
            if isinstance(node, scopes) and body and _is_docstring(body[0]):
                body[0] = ast.Pass()
        digest.update(path.encode() + b"\0" + ast.dump(tree).encode())
    return digest.hexdigest()


def _is_docstring(statement: ast.stmt) -> bool:
    return (
        isinstance(statement, ast.Expr)
        and isinstance(statement.value, ast.Constant)
        and isinstance(statement.value.value, str)
    )


def committed_sources(commit: str) -> dict[str, str] | None:
    """Return skdeep's Python files at ``commit`` (None when git does not know it)."""
    listing = subprocess.run(
        ["git", "ls-tree", "-r", "--name-only", commit, "skdeep"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    if listing.returncode != 0:
        return None
    paths = [p for p in listing.stdout.split() if p.endswith(".py")]
    show = partial(subprocess.run, cwd=ROOT, capture_output=True, text=True, check=True)
    return {p: show(["git", "show", f"{commit}:{p}"]).stdout for p in paths}


def files_digest(sources: dict[str, str]) -> str:
    """Return the digest that :func:`bench_domain_adaptation.code_version` records."""
    digest = hashlib.sha256()
    for path in sorted(sources):
        digest.update(path.encode() + b"\0" + sources[path].encode())
    return digest.hexdigest()[:12]


def is_todays_code(version: str, today: str) -> bool:
    """Tell whether a record's ``version`` ("commit, skdeep files D") is today's code."""
    commit, _, digest = version.partition(", skdeep files ")
    sources = committed_sources(commit)
    return (
        sources is not None
        and files_digest(sources) == digest
        and code_without_docstrings(sources) == today
    )


def main() -> None:
    """Refit what needs it on this kind of machine, then write the table of every kind."""
    if "OMP_WAIT_POLICY" not in os.environ:  # as bench_domain_adaptation.py, for speed only
        environment = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        os.execve(sys.executable, [sys.executable, *sys.argv], environment)
    torch.set_num_threads(THREADS)
    device = resolve_device("cpu")
    kind = machine_kind()
    records = Records("domain_adaptation_kinds", fresh=False, by_kind=True)
    today = code_without_docstrings(
        {p.relative_to(ROOT).as_posix(): p.read_text() for p in (ROOT / "skdeep").rglob("*.py")}
    )
    refits = (
        [json.loads(line) for line in REFITS.read_text().splitlines()] if REFITS.exists() else []
    )
    done = {(r["machine"], r["method"], r["seed"]) for r in refits}

    # Code versions per kind of machine, in the order of the records.
    versions: dict[str, dict[str, list[dict]]] = {}
    for row in records.rows:
        versions.setdefault(row["machine"], {}).setdefault(row["code"], []).append(row)
    same = {v for by_code in versions.values() for v in by_code if is_todays_code(v, today)}
    arms = kind_arms(device)
    loaders = {DIGITS: digits_task, SMALL: partial(digits_task, 2000), MNIST_M: mnist_m_task}
    tasks: dict[str, tuple] = {}
    for version, rows in versions.get(kind, {}).items():
        if version in same:
            continue
        row = min(rows, key=lambda r: r["seconds"])
        if (kind, row["method"], row["seed"]) in done:
            continue
        task_name, fit = arms[row["method"]]
        if task_name not in tasks:
            tasks[task_name] = loaders[task_name]()
        start = time.perf_counter()
        refit = fit(tasks[task_name], row["seed"])["accuracy"]
        result = {
            "machine": kind, "method": row["method"], "seed": row["seed"],
            "recorded_code": version, "recorded": row["accuracy"], "refit": refit,
            "code": code_version(), "seconds": time.perf_counter() - start,
        }  # fmt: skip
        print(json.dumps(result), flush=True)
        refits.append(result)
        with REFITS.open("a") as file:
            file.write(json.dumps(result) + "\n")

    report = Report("domain_adaptation_refit", device)
    for machine_name, by_code in versions.items():
        todays = [v for v in by_code if v in same]
        report.note(
            f"{machine_name}: {len(todays)} of the {len(by_code)} code versions in the kinds "
            f"records are today's code once docstrings are set aside "
            f"({'; '.join(todays) or 'none'}); each other version's fastest record is "
            "refitted with today's code (run this script on that kind to fill it in)."
        )
    report.table(
        "Records of older code, refitted with today's code (target accuracy %)",
        ["kind", "method", "seed", "recorded by", "recorded", "refit", "equal"],
        [
            [r["machine"], r["method"], r["seed"], r["recorded_code"], 100 * r["recorded"],
             100 * r["refit"], r["recorded"] == r["refit"]]
            for r in refits
        ],
    )  # fmt: skip
    report.write()


if __name__ == "__main__":
    main()
