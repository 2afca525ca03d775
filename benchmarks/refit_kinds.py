"""Refit the ``kinds`` section's records of older code, to see that they reproduce.

Run:  .venv/bin/python benchmarks/refit_kinds.py
      (``ONEDNN_MAX_CPU_ISA=AVX2`` before it checks the AVX2-capped kind's records)

The ``kinds`` section of ``bench_domain_adaptation.py`` pairs fits that several commits
made (each record names its commit and a digest of skdeep's Python files as they were).
A pair is fair only if the older fit is what today's code would give. For each code
version in the records of this kind of machine:

- a committed version whose code is today's once docstrings are set aside (the
  record's digest matches the commit's files, and the commit's syntax trees without
  docstrings equal the working tree's) is the same code for these fits: nothing to
  refit (skdeep reads no docstring on the path of a fit);
- any other version (older code, files that were never committed, or a commit this
  clone does not hold) has the fastest record of each of its arms refitted with
  today's code, and every recorded figure (the accuracy and the weight averages)
  compared with the refit's.

Writes ``results/domain_adaptation_refit.{jsonl,md}``. The jsonl keeps every refit, of
every kind and by whichever code; the table shows the refits by today's skdeep files,
so a run after skdeep changes refits again. About 25 minutes per kind on 2 cores here.
"""

from __future__ import annotations

import ast
import hashlib
import json
import subprocess
import time
from pathlib import Path

import torch
from _common import RESULTS, Report
from bench_domain_adaptation import (
    THREADS,
    Records,
    code_version,
    files_digest,
    kind_arms,
    kind_tasks,
    machine_kind,
    run_with_passive_openmp,
    skdeep_sources,
)

from skdeep._device import resolve_device

ROOT = Path(__file__).resolve().parent.parent
REFITS = RESULTS / "domain_adaptation_refit.jsonl"


def code_without_docstrings(sources: dict[str, bytes]) -> str:
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


def git(*args: str) -> bytes | None:
    """Return the output of a git command in the repository (None when it fails)."""
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True)
    except OSError:  # no git
        return None
    return done.stdout if done.returncode == 0 else None


def committed_sources(commit: str) -> dict[str, bytes] | None:
    """Return skdeep's Python files at ``commit`` (None when git does not know it)."""
    listing = git("ls-tree", "-r", "--name-only", f"{commit}^{{commit}}", "--", "skdeep")
    if listing is None:
        return None
    paths = [p for p in listing.decode().split() if p.endswith(".py")]
    sources = {p: git("show", f"{commit}:{p}") for p in paths}
    return None if None in sources.values() else sources


def version_status(version: str, today: str) -> str:
    """Say whether a record's ``version`` ("commit, skdeep files D") is today's code.

    Returns "today's code", "other code", or "unknown commit" (not in this clone).
    """
    commit, _, digest = version.partition(", skdeep files ")
    sources = committed_sources(commit)
    if sources is None:
        return "unknown commit"
    if files_digest(sources) == digest and code_without_docstrings(sources) == today:
        return "today's code"
    return "other code"


def files_of(version: str) -> str:
    """Return the skdeep files digest of a ``code_version`` string."""
    return version.partition(", skdeep files ")[2]


def main() -> None:
    """Refit what needs it on this kind of machine, then write the table of every kind."""
    run_with_passive_openmp()
    torch.set_num_threads(THREADS)
    device = resolve_device("cpu")
    kind = machine_kind()
    records = Records("domain_adaptation_kinds", fresh=False, by_kind=True)
    today = code_without_docstrings(skdeep_sources())
    today_files = files_of(code_version())
    refits = []
    if REFITS.exists():
        refits = [json.loads(line) for line in REFITS.read_text().splitlines()]
    current = [r for r in refits if files_of(r["code"]) == today_files]
    done = {(r["machine"], r["method"], r["seed"]) for r in current}

    # Code versions per kind of machine, in the order of the records.
    versions: dict[str, dict[str, list[dict]]] = {}
    for row in records.rows:
        versions.setdefault(row["machine"], {}).setdefault(row["code"], []).append(row)
    status = {v: version_status(v, today) for by_code in versions.values() for v in by_code}
    arms = kind_arms(device)
    loaders = kind_tasks()
    tasks: dict[str, tuple] = {}
    for version, rows in versions.get(kind, {}).items():
        if status[version] == "today's code":
            continue
        fastest: dict[str, dict] = {}
        for row in rows:
            if row["method"] not in arms:  # an arm screened once and dropped
                continue
            if row["method"] not in fastest or row["seconds"] < fastest[row["method"]]["seconds"]:
                fastest[row["method"]] = row
        for row in fastest.values():
            if (kind, row["method"], row["seed"]) in done:
                continue
            task_name, fit = arms[row["method"]]
            if task_name not in tasks:
                tasks[task_name] = loaders[task_name]()
            start = time.perf_counter()
            refit = fit(tasks[task_name], row["seed"])
            compared = [key for key in refit if key in row]
            result = {
                "machine": kind, "method": row["method"], "seed": row["seed"],
                "recorded_code": version, "recorded": row["accuracy"],
                "refit": refit["accuracy"], "compared": compared,
                "equal": all(refit[key] == row[key] for key in compared),
                "code": code_version(), "seconds": time.perf_counter() - start,
            }  # fmt: skip
            print(json.dumps(result), flush=True)
            current.append(result)
            done.add((kind, row["method"], row["seed"]))
            with REFITS.open("a") as file:
                file.write(json.dumps(result) + "\n")

    report = Report("domain_adaptation_refit", device)
    for machine_name, by_code in versions.items():
        todays = [v for v in by_code if status[v] == "today's code"]
        unknown = [v for v in by_code if status[v] == "unknown commit"]
        report.note(
            f"{machine_name}: {len(todays)} of the {len(by_code)} code versions in the kinds "
            f"records are today's code once docstrings are set aside "
            f"({'; '.join(todays) or 'none'}); "
            f"{len(unknown)} name a commit this clone does not hold. "
            "Each other version has the fastest record of each of its arms refitted with "
            "today's code (run this script on that kind to fill it in)."
        )
    report.table(
        f"Records of older code, refitted with today's code (skdeep files {today_files}; "
        f"target accuracy %; 'compared' counts the recorded figures compared: the accuracy, "
        f"and the weight averages where the refit recorded them)",
        ["kind", "method", "seed", "recorded by", "recorded", "refit", "compared", "equal"],
        [
            [r["machine"], r["method"], r["seed"], r["recorded_code"], 100 * r["recorded"],
             100 * r["refit"], len(r["compared"]), r["equal"]]
            for r in current
        ],
    )  # fmt: skip
    report.write()


if __name__ == "__main__":
    main()
