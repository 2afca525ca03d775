"""Helpers shared by the benchmarks: timing, memory sampling and result files."""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import skdeep
from skdeep._compat import cpu_instruction_sets

RESULTS = Path(__file__).parent / "results"


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Time each callable ``repeats`` times; return the median seconds of each.

    Runs are interleaved so that machine noise hits all of them alike, after one
    untimed warm-up run each.
    """
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


class Sampler:
    """Call ``sample()`` every ``interval`` seconds in a thread, inside a ``with`` block."""

    interval = 0.005

    def sample(self) -> None:
        """Take one measurement."""
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def __enter__(self):
        """Start sampling."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        """Stop sampling (after one last measurement)."""
        self._stop.set()
        self._thread.join()
        self.sample()


class PeakMemory(Sampler):
    """Measure the peak resident memory of this process, and its rise above the start."""

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as file:
            return int(file.read().split()[1]) * 4096

    def __enter__(self) -> PeakMemory:
        """Record the starting level, then sample."""
        self._base = self.peak_resident_bytes = self._rss()
        return super().__enter__()

    def sample(self) -> None:
        """Update the peak."""
        self.peak_resident_bytes = max(self.peak_resident_bytes, self._rss())

    @property
    def peak_bytes(self) -> int:
        """Return the peak above the level at entry."""
        return self.peak_resident_bytes - self._base


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """Format rows as a Markdown table (as the documentation's pages quote it)."""
    cells = [[_format(value) for value in row] for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(header)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for row in cells:
        lines.append("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |")
    return "\n".join(lines)


class Report:
    """Tables of one benchmark, printed as they come and written to ``results/``.

    The file starts with the date, the command, the machine (CPU model and instruction
    sets, threads, GPU) and the versions of the libraries, since the figures depend
    on all of them. The documentation's benchmark pages quote these files. A run on a
    GPU writes ``results/<name>_cuda.md``, so that it never overwrites the CPU's figures.
    """

    def __init__(self, name: str, device: torch.device, libraries: tuple[str, ...] = ()):
        if device.type == "cuda":
            name += "_cuda"
        self.path = RESULTS / f"{name}.md"
        self.parts = [f"# {name}\n", machine_description(device, libraries)]
        print(self.parts[-1], flush=True)

    def table(self, title: str, header: list[str], rows: list[list[object]]) -> None:
        """Add a table (and print it)."""
        text = f"## {title}\n\n{markdown_table(header, rows)}\n"
        print("\n" + text, flush=True)
        self.parts.append(text)

    def note(self, text: str) -> None:
        """Add a paragraph (and print it)."""
        print("\n" + text, flush=True)
        self.parts.append(text + "\n")

    def write(self) -> None:
        """Write the report to ``benchmarks/results/<name>.md``."""
        RESULTS.mkdir(exist_ok=True)
        self.path.write_text("\n".join(self.parts))
        print(f"\nwrote {self.path}")


def report_name(base: str, sections, all_sections, quick: bool) -> str:
    """Name a results file: ``base``, then the sections run when not all, then ``_quick``."""
    name = base
    if tuple(sections) != tuple(all_sections):
        name += "_" + "_".join(sections)
    return name + ("_quick" if quick else "")


def paired_rows(
    values: dict[str, dict[int, float]], reference: str, seconds: dict[str, dict[int, float]]
) -> list[list]:
    """Rows comparing methods measured on the same seeds: mean, std, paired difference.

    For each method: the mean over seeds, the standard deviation (ddof=1), the number
    of seeds, the mean of its seed-by-seed difference to ``reference`` with the 95%
    interval of that mean (Student's t), and the mean seconds per fit.
    """
    rows = []
    for method, by_seed in values.items():
        if not by_seed:  # not run (yet)
            continue
        scores = np.array(list(by_seed.values()))
        spread = scores.std(ddof=1) if len(scores) > 1 else float("nan")
        difference = "" if method == reference else paired_difference(by_seed, values[reference])
        rows.append(
            [method, scores.mean(), spread, len(scores), difference,
             np.mean(list(seconds[method].values()))]
        )  # fmt: skip
    return rows


def paired_difference(by_seed: dict[int, float], reference: dict[int, float]) -> str:
    """Mean of ``by_seed`` minus ``reference`` on their common seeds, with its 95% interval.

    The interval is Student's t on the seed-by-seed differences; empty when fewer than
    two seeds are common.
    """
    interval = paired_interval(by_seed, reference)
    if interval is None:
        return ""
    mean, low, high, _ = interval
    return f"{mean:+.1f} ({low:+.1f} to {high:+.1f})"


def paired_interval(
    by_seed: dict[int, float], reference: dict[int, float]
) -> tuple[float, float, float, int] | None:
    """Mean of ``by_seed`` minus ``reference`` on their common seeds, its 95% interval, n.

    Student's t on the seed-by-seed differences; None when fewer than two seeds are
    common.
    """
    from scipy import stats

    common = sorted(set(by_seed) & set(reference))
    if len(common) < 2:
        return None
    gaps = np.array([by_seed[s] - reference[s] for s in common])
    half = stats.t.ppf(0.975, len(gaps) - 1) * gaps.std(ddof=1) / np.sqrt(len(gaps))
    mean = gaps.mean()
    return float(mean), float(mean - half), float(mean + half), len(common)


def _format(value: object) -> str:
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"
    return str(value)


def ready_tensors(extractor, images, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """All of ``images`` preprocessed by a fitted skdeep ``extractor``: network input."""
    from skdeep._images import as_image_source

    return torch.cat(list(extractor._input_batches(as_image_source(images), dtype=dtype)))


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Return the cosine similarity of each row of ``a`` with the same row of ``b``."""
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def cpu_model() -> str:
    """Return the CPU's model name (Linux), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as file:
            names = [line.split(":", 1)[1].strip() for line in file if "model name" in line]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or "unknown CPU"


def cpu_summary() -> str:
    """Describe the CPU: model, torch threads and the instruction sets that matter."""
    flags = cpu_instruction_sets()
    present = [name for name, has in flags.items() if has] or ["none of them"]
    return (
        f"{cpu_model()}, {torch.get_num_threads()} torch threads; instruction sets: "
        f"{', '.join(present)} (of {', '.join(flags)})"
    )


def machine() -> str:
    """Describe the device of a table in a few words (for table titles)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


# What oneDNN accepts in ONEDNN_MAX_CPU_ISA (in any case; it ignores anything else).
ONEDNN_ISAS = (
    "SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
    "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX512_CORE_AMX",
    "AVX10_1_512_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16", "AVX10_2_512",
    "AVX10_2_512_AMX_2",
)  # fmt: skip


@functools.cache
def kernel_caps() -> tuple[str, ...]:
    """Return the settings that cap this CPU's kernels, as ``NAME=VALUE`` (read once).

    ``ONEDNN_MAX_CPU_ISA`` (or its older name ``DNNL_MAX_CPU_ISA``; oneDNN's convolutions)
    and ``ATEN_CPU_CAPABILITY`` (PyTorch's own vector kernels) make one CPU run the
    kernels of an older one, whose speed and float rounding differ. Each is named as the
    libraries read it (oneDNN's in upper case, ``ALL`` being no cap); a value that a
    library would ignore raises, so that no run is labelled with a cap it did not have.
    """
    caps = []
    onednn_name = next(
        (n for n in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA") if os.environ.get(n)), None
    )
    if onednn_name is not None:
        value = os.environ[onednn_name].upper()
        if value not in (*ONEDNN_ISAS, "ALL"):
            raise ValueError(
                f"{onednn_name}={os.environ[onednn_name]!r} is not a value oneDNN accepts "
                f"(it would run its usual kernels); expected one of {', '.join(ONEDNN_ISAS)}"
            )
        if value != "ALL":
            caps.append(f"ONEDNN_MAX_CPU_ISA={value}")
    aten = os.environ.get("ATEN_CPU_CAPABILITY")
    if aten:
        running = torch.backends.cpu.get_cpu_capability()
        if aten != running.lower():
            raise ValueError(
                f"ATEN_CPU_CAPABILITY={aten!r} is not what PyTorch runs ({running}); it "
                "accepts lower-case names such as 'avx2' up to what the CPU has"
            )
        caps.append(f"ATEN_CPU_CAPABILITY={aten}")
    return tuple(caps)


def machine_description(device: torch.device, libraries: tuple[str, ...] = ()) -> str:
    """Describe the date, command, machine and versions, as the head of a result file."""
    versions = [f"Python {platform.python_version()}", f"skdeep {skdeep.__version__}"]
    for package in ("torch", "torchvision", "scikit-learn", "numpy", *libraries):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} (not installed)")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none used"
    command = shlex.join([*kernel_caps(), "python", *sys.argv])
    return (
        f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}\n"
        f"- command: `{command}`\n"
        f"- CPU: {cpu_summary()}\n"
        f"- GPU: {gpu}\n"
        f"- versions: {', '.join(versions)}\n"
    )
