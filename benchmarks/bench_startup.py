"""Start-up: how long skdeep takes before its first image.

Run:  .venv/bin/python benchmarks/bench_startup.py [--quick]
(``make bench`` runs it; it writes results/startup.md.)

Each measure runs in fresh Python processes (the imports are what is measured), median
of 3, interleaved:

1. ``import skdeep`` (it imports torch and scikit-learn only when a name needs them),
   against importing what the first estimator needs (``skdeep.FeatureExtractor``), as
   ``python -X importtime`` counts them;
2. ``python -m skdeep --help`` and ``python -m skdeep cache info``, which answer without
   torch;
3. the fixed cost of ``python -m skdeep extract FILES --workers 2 --out f.zarr`` on 8
   small PNG files (random weights, 32 px): the command line, which starts its Dask
   workers at once (they import skdeep while this process does), against the same
   steps one after the other in one script (import, build the network, start the
   cluster, extract), the order the command line used before.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import Report, machine
from PIL import Image

SEQUENTIAL = """
import sys
from pathlib import Path
from skdeep import FeatureExtractor
from skdeep.dask import extract, local_cluster
from distributed import Client

if __name__ == "__main__":
    folder, out = sys.argv[1], sys.argv[2]
    paths = sorted(str(p) for p in Path(folder).glob("*.png"))
    extractor = FeatureExtractor("mobilenet_v2", weights=None, image_size=32,
                                 random_state=0).fit(paths)
    with local_cluster(2) as cluster, Client(cluster) as client:
        extract(extractor, paths, out, client=client, verbose=False)
"""


def seconds(command: list[str]) -> float:
    """Wall seconds of one run of ``command`` (which must succeed)."""
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(f"{command} failed:\n{result.stderr[-2000:]}")
    return elapsed


def import_seconds(statement: str) -> float:
    """Seconds of imports that ``statement`` triggers, as ``-X importtime`` counts them."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", statement], capture_output=True, text=True
    )
    total = 0
    for line in result.stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if match and len(match[3]) == 1:  # top-level imports: their cumulative times
            total += int(match[2])
    return total / 1e6


def median_of(runs: dict[str, callable], repeats: int) -> dict[str, float]:
    """Median seconds of each run, the runs interleaved."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(run())
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    """Measure and write results/startup.md."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repeat")
    args = parser.parse_args()
    repeats = 1 if args.quick else 3
    report = Report("startup" + ("_quick" if args.quick else ""), torch.device("cpu"))
    python = sys.executable

    imports = median_of(
        {
            "import skdeep": lambda: import_seconds("import skdeep"),
            "import skdeep; skdeep.FeatureExtractor": lambda: import_seconds(
                "import skdeep; skdeep.FeatureExtractor"
            ),
        },
        repeats,
    )
    with tempfile.TemporaryDirectory() as folder:
        commands = median_of(
            {
                "python -m skdeep --help": lambda: seconds([python, "-m", "skdeep", "--help"]),
                "python -m skdeep cache info FOLDER": lambda: seconds(
                    [python, "-m", "skdeep", "cache", "info", folder]
                ),
            },
            repeats,
        )
        images = Path(folder) / "images"
        images.mkdir()
        rng = np.random.default_rng(0)
        for index in range(8):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(images / f"{index}.png")
        script = Path(folder) / "sequential.py"
        script.write_text(SEQUENTIAL)
        runs = iter(range(1000))
        cli = [
            python, "-m", "skdeep", "extract", str(images), "--weights", "none",
            "--image-size", "32", "--random-state", "0", "--workers", "2", "--quiet",
        ]  # fmt: skip
        extraction = median_of(
            {
                "command line (workers start at once)": lambda: seconds(
                    [*cli, "--out", f"{folder}/cli{next(runs)}.zarr"]
                ),
                "one step after the other (import, network, cluster)": lambda: seconds(
                    [python, str(script), str(images), f"{folder}/seq{next(runs)}.zarr"]
                ),
            },
            repeats,
        )
    report.table(
        f"Imports, as python -X importtime counts them, median of {repeats} ({machine()})",
        ["what", "seconds"],
        [[name, value] for name, value in imports.items()],
    )
    report.table(
        f"Commands that need no network, median of {repeats} ({machine()})",
        ["command", "seconds"],
        [[name, value] for name, value in commands.items()],
    )
    baseline = extraction["one step after the other (import, network, cluster)"]
    report.table(
        f"Fixed cost of extract --workers 2 on 8 PNG files (random mobilenet_v2 at 32 px), "
        f"median of {repeats} ({machine()})",
        ["how", "seconds", "x one step after the other"],
        [[name, value, value / baseline] for name, value in extraction.items()],
    )
    report.write()


if __name__ == "__main__":
    main()
