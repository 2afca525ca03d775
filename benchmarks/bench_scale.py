"""Scaling out: one process against a Dask cluster and the command line, memory, cache.

Run:  .venv/bin/python benchmarks/bench_scale.py [--quick] [--data DIR] [--device cuda]
(``make bench`` runs it; it writes results/scale.md. Needs ``skdeep[dask]``. With
``--device cuda``, only table 1 at 224 px: (a) on one GPU, (b) and (c) with one worker
per GPU of the machine, ``local_cluster(gpus=...)`` and ``--device cuda --workers N``;
it writes results/scale_cuda.md.)

Images are files on disk: Fashion-MNIST digits of clothing (Debian's
``dataset-fashion-mnist``; MNIST 5k when it is missing) written as 28x28 PNG files
for the small input size, and brought to 256x256 RGB JPEG files for 224 px. The
network is mobilenet_v2 (random weights: the speed is the same as ImageNet's).

1. Images per second, file to feature row, of (a) ``FeatureExtractor.transform`` in
   this process (torch's threads on every core), (b) ``skdeep.dask.extract`` on a
   ``LocalCluster`` of single-threaded workers, one per core, started beforehand, and
   (c) ``python -m skdeep extract --workers N``, timed end to end (process start,
   cluster start and all). (b) and (c) write a zarr store; (a) returns an array.
   (c)'s fixed cost is timed apart, on 64 files.
2. Resident memory of (a) at its peak (it returns the whole array) and of the
   largest worker of (b), at rest and at its peak, at 20,000 and 100,000 images:
   a worker's must not grow with the number of images.
3. The per-image feature cache: seconds to look up 1,000 images in caches holding
   1,000 and 200,000 images (of 128 features); the two must stay within 2x.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from _common import PeakMemory, Report, Sampler, machine
from distributed import Client
from PIL import Image

from skdeep import FeatureExtractor
from skdeep import dask as skdeep_dask
from skdeep._feature_cache import FeatureCache
from skdeep.datasets import DatasetUnavailableError, load_fashion_mnist, load_mnist_5k


def source_images() -> tuple[np.ndarray, str]:
    """Return grayscale 28x28 images to write as files, and their name."""
    try:
        train, _ = load_fashion_mnist("train")
        test, _ = load_fashion_mnist("test")
        return np.concatenate([train, test]), "Fashion-MNIST"
    except DatasetUnavailableError:
        return load_mnist_5k()[0], "MNIST 5k"


def write_files(folder: Path, n: int, large: bool) -> list[str]:
    """Write ``n`` image files (PNG 28x28, or JPEG 256x256 RGB) unless already there."""
    images, _ = source_images()
    folder.mkdir(parents=True, exist_ok=True)
    suffix = "jpg" if large else "png"
    paths = [str(folder / f"{index:06d}.{suffix}") for index in range(n)]
    for index, path in enumerate(paths):
        if os.path.exists(path):
            continue
        image = Image.fromarray(images[index % len(images)])
        if large:
            tint = Image.merge("RGB", [image, image.rotate(90), image.transpose(0)])
            tint.resize((256, 256), Image.BILINEAR).save(path, quality=90)
        else:
            image.save(path)
    return paths


def extractor(image_size: int | None) -> FeatureExtractor:
    """Return the benchmark's extractor (fitted)."""
    return FeatureExtractor(
        "mobilenet_v2",
        weights=None,
        image_size=image_size,
        precision="float32",
        random_state=0,
        batch_size=64,
    ).fit()


class WorkerMemory(Sampler):
    """Sample the resident memory of the worker processes of a cluster."""

    interval = 0.02

    def __init__(self, client: Client):
        self.processes = [psutil.Process(pid) for pid in client.run(os.getpid).values()]
        self.peaks = {process.pid: 0 for process in self.processes}

    def sample(self) -> None:
        """Update each worker's peak."""
        for process in self.processes:
            rss = process.memory_info().rss
            self.peaks[process.pid] = max(self.peaks[process.pid], rss)

    def peak_mib(self) -> float:
        """Return the largest peak of any worker, in MiB."""
        return max(self.peaks.values()) / 2**20

    def now_mib(self) -> float:
        """Return the resident memory of the largest worker now, in MiB."""
        return max(process.memory_info().rss for process in self.processes) / 2**20


def in_process(paths, image_size) -> tuple[float, float, float]:
    """Time (a); return seconds, peak resident memory and output array size, MiB."""
    model = extractor(image_size)
    model.transform(paths[:64])  # warm-up
    with PeakMemory() as peak:
        start = time.perf_counter()
        features = model.transform(paths)
        seconds = time.perf_counter() - start
    return seconds, peak.peak_resident_bytes / 2**20, features.nbytes / 2**20


def on_cluster(client, paths, image_size, out: Path) -> tuple[float, float, float]:
    """Time (b); return seconds, and the largest worker's memory at rest and at peak, MiB."""
    model = extractor(image_size)
    shutil.rmtree(out, ignore_errors=True)
    # Warm-up: every worker builds its network once (as in any long run).
    skdeep_dask.extract(model, paths[:256], out, client=client, partition_size=64, verbose=False)
    shutil.rmtree(out)
    with WorkerMemory(client) as memory:
        at_rest = memory.now_mib()
        start = time.perf_counter()
        skdeep_dask.extract(model, paths, out, client=client, verbose=False)
        seconds = time.perf_counter() - start
    shutil.rmtree(out)
    return seconds, at_rest, memory.peak_mib()


def command_line(folder: Path, image_size, workers: int, out: Path, device="cpu") -> float:
    """Time (c), end to end; return seconds."""
    shutil.rmtree(out, ignore_errors=True)
    size = [] if image_size is None else ["--image-size", str(image_size)]
    command = [
        sys.executable, "-m", "skdeep", "extract", str(folder), "--out", str(out),
        "--backbone", "mobilenet_v2", "--weights", "none", "--random-state", "0",
        "--precision", "float32", "--workers", str(workers), "--device", device, "--quiet",
        *size,
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - start
    shutil.rmtree(out)
    return seconds


def throughput_rows(client, workers, data: Path, work: Path, sizes, device="cpu"):
    """Images per second of (a), (b) and (c) for each input size.

    Returns the table's rows, and (label, images, seconds of (a), seconds of (c)) of
    each size for :func:`fixed_cost_rows`.
    """
    rows, timings = [], []
    cluster = (
        f"(b) local_cluster(gpus=...), {workers} worker(s), one GPU each"
        if device == "cuda"
        else f"(b) LocalCluster, {workers} workers x 1 thread"
    )
    for label, image_size, n, large in sizes:
        folder = data / ("jpeg256" if large else "png28") / str(n)
        paths = write_files(folder, n, large)
        a = in_process(paths, image_size)[0]
        b = on_cluster(client, paths, image_size, work / "b.zarr")[0]
        c = command_line(folder, image_size, workers, work / "c.zarr", device)
        for method, seconds in [
            ("(a) transform, one process" + (", one GPU" if device == "cuda" else ""), a),
            (cluster, b),
            (f"(c) CLI --workers {workers} --device {device} (end to end)", c),
        ]:
            rows.append([label, n, method, n / seconds, f"{a / seconds:.2f}"])
        timings.append((label, n, a, c))
    return rows, timings


def fixed_cost_rows(data: Path, work: Path, workers: int, timings) -> list[list[object]]:
    """(c)'s fixed cost, timed on 64 small files, and (c) net of it for each size.

    The fixed cost is what does not depend on the number of images: starting Python
    and importing torch, starting the cluster, each worker importing torch and
    building the network, and closing it all.
    """
    folder = data / "png28" / "64"
    write_files(folder, 64, large=False)
    fixed = statistics.median(
        command_line(folder, 32, workers, work / "fixed.zarr") for _ in range(3)
    )
    rows = []
    for label, n, a, c in timings:
        rate = n / (c - fixed)
        rows.append([label, n, c, fixed, rate, f"{a * rate / n:.2f}"])
    return rows


def memory_rows(client, data: Path, work: Path, counts) -> list[list[object]]:
    """Peak memory of (a) and of the workers of (b) at growing numbers of images."""
    rows = []
    for n in counts:
        paths = write_files(data / "png28" / str(max(counts)), max(counts), False)[:n]
        _, process_peak, output = in_process(paths, 32)
        _, worker_rest, worker_peak = on_cluster(client, paths, 32, work / "m.zarr")
        rows.append([n, process_peak, output, worker_rest, worker_peak])
    return rows


def cache_rows(work: Path, sizes, lookups: int = 1000, width: int = 128) -> list[list[object]]:
    """Seconds to look up ``lookups`` cached images in caches of growing size."""
    rows = []
    rng = np.random.default_rng(0)
    for size in sizes:
        location = work / f"cache{size}"
        shutil.rmtree(location, ignore_errors=True)
        cache = FeatureCache(location, "settings")
        keys = [int(i).to_bytes(16, "little") for i in range(size)]
        for start in range(0, size, 10_000):
            block = keys[start : start + 10_000]
            cache.store(block, rng.random((len(block), width), dtype=np.float32))
        wanted = [keys[i] for i in rng.choice(size, lookups, replace=False)]
        times = []
        for _ in range(7):
            start = time.perf_counter()
            _, missing = cache.lookup(wanted, width)
            times.append(time.perf_counter() - start)
            assert not len(missing)
        rows.append([size, lookups, statistics.median(times)])
    base = rows[0][2]
    for row in rows:
        row.append(f"{row[2] / base:.2f}")
    return rows


def main() -> None:
    """Run the three tables and write results/scale.md."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few images, for a smoke run")
    parser.add_argument("--data", default=None, help="folder for the image files (kept)")
    parser.add_argument("--large-images", type=int, default=20_000, help="files at 224 px")
    parser.add_argument("--small-images", type=int, default=100_000, help="files at 32 px")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    if args.device == "cuda":
        gpu_throughput(args)
        return
    workers = os.cpu_count() or 1
    device = torch.device("cpu")
    report = Report("scale" + ("_quick" if args.quick else ""), device, ("dask", "zarr"))
    data = Path(args.data or tempfile.mkdtemp(prefix="skdeep-bench-scale-"))
    large, small = (128, 2000) if args.quick else (args.large_images, args.small_images)
    counts = [500, 2000] if args.quick else [20_000, 100_000]
    cache_sizes = [1000, 20_000] if args.quick else [1000, 200_000]
    with tempfile.TemporaryDirectory() as work_dir:
        work = Path(work_dir)
        cluster = skdeep_dask.local_cluster(workers)  # what --workers starts
        with cluster, Client(cluster) as client:
            rows, timings = throughput_rows(
                client,
                workers,
                data,
                work,
                [
                    ("224 px (JPEG 256x256)", None, large, True),
                    ("32 px (PNG 28x28)", 32, small, False),
                ],
            )
            report.table(
                f"Throughput, image files -> feature rows, mobilenet_v2 float32 ({machine()})",
                ["input", "images", "method", "images/s", "x (a)"],
                rows,
            )
            report.table(
                "(c) net of its fixed cost (the same command on 64 files, median of 3)",
                ["input", "images", "(c) seconds", "fixed cost, s", "net images/s", "x (a)"],
                fixed_cost_rows(data, work, workers, timings),
            )
            report.table(
                "Resident memory at 32 px, MiB: (a) the process at its peak, and its output "
                "array; (b) the largest worker before the run (network built) and at its peak",
                ["images", "(a) peak", "(a) output array", "(b) worker at rest", "(b) worker peak"],
                memory_rows(client, data, work, counts),
            )
        report.table(
            "Feature cache: look up 1,000 cached images (128 features each)",
            ["images in the cache", "looked up", "seconds (median of 7)", "x smallest cache"],
            cache_rows(work, cache_sizes),
        )
    report.note(
        "(a) runs torch's intra-op threads over all cores in one process; (b) and (c) "
        "run one single-threaded worker per core, each decoding its own files. (b)'s "
        "cluster was started and warmed up before timing; (c) includes starting Python, "
        "the cluster and its workers. Memory of (a) includes the decoded batch and "
        "the network; workers of (b) hold one partition (1,024 images) at a time."
    )
    if args.data is None:
        shutil.rmtree(data, ignore_errors=True)
    report.write()


def gpu_throughput(args) -> None:
    """Table 1 at 224 px on a GPU machine: one process on one GPU, one worker per GPU."""
    gpus = list(range(torch.cuda.device_count()))
    report = Report("scale" + ("_quick" if args.quick else ""), torch.device("cuda"), ("dask",))
    data = Path(args.data or tempfile.mkdtemp(prefix="skdeep-bench-scale-"))
    n = 512 if args.quick else min(args.large_images, 4000)
    with tempfile.TemporaryDirectory() as work_dir:
        cluster = skdeep_dask.local_cluster(gpus=gpus)  # what --device cuda --workers starts
        with cluster, Client(cluster) as client:
            placed = sorted(client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES")).values())
            rows, _ = throughput_rows(
                client, len(gpus), data, Path(work_dir),
                [("224 px (JPEG 256x256)", None, n, True)], device="cuda",
            )  # fmt: skip
    report.table(
        f"Throughput on {len(gpus)} GPU(s), image files -> feature rows, mobilenet_v2 "
        f"float32 ({machine()})",
        ["input", "images", "method", "images/s", "x (a)"],
        rows,
    )
    report.note(
        f"Workers' CUDA_VISIBLE_DEVICES: {placed}. Each worker decodes its own files on "
        "one CPU thread; with one GPU, (b) and (c) show what one worker adds or costs "
        "against the process itself."
    )
    if args.data is None:
        shutil.rmtree(data, ignore_errors=True)
    report.write()


if __name__ == "__main__":
    main()
