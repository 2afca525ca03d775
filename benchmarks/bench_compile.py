"""Would a ``compile`` option pay? torch.compile on top of skdeep's inference rewrites.

Run:  .venv/bin/python benchmarks/bench_compile.py [--quick] [--device cuda]
(``make bench`` runs it; it writes results/compile.md.)

For mobilenet_v2 and resnet18 at 224 px in float32 (random weights: the speed is the
same as ImageNet's), the network alone on ready, preprocessed tensors, i.e. the
ceiling of ``bench_extraction.py``:

- skdeep's network (batch norms folded, convolutions fused with the activation after
  them), eager: what ``FeatureExtractor`` runs today;
- the same network under ``torch.compile`` (inductor, default mode);
- torchvision's unmodified network, eager and under ``torch.compile``.

A compiled network pays for its warm-up (the first call compiles) only over a long
enough run: the table gives the warm-up and the number of images after which the
compiled network has caught up with skdeep's eager one ("never" when it is not
faster). Every batch has the same size, so each network compiles once. Inductor
caches what it compiled on disk, which would make a second run's warm-up look short:
the script gives it an empty cache folder, as on a machine that compiles for the
first time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

# Before torch is imported: an empty compile cache for this run (see above).
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="skdeep-bench-inductor-")

import torch
import torchvision
from _common import Report, machine, median_seconds, ready_tensors, synchronize
from bench_extraction import model_alone

from skdeep import FeatureExtractor

BATCH_SIZE = 64


def warm_up_seconds(module, ready: torch.Tensor, device: torch.device) -> float:
    """Time the first forward pass of one batch (for a compiled module: the compilation)."""
    start = time.perf_counter()
    with torch.inference_mode():
        module(ready[:BATCH_SIZE])
    synchronize(device)
    return time.perf_counter() - start


def compile_rows(model_name: str, device: torch.device, n_images: int, repeats: int):
    """Images per second, warm-up and break-even of the four networks of one backbone."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (n_images, 224, 224, 3), dtype=torch.uint8).numpy()
    extractor = FeatureExtractor(
        model_name, weights=None, precision="float32", device=str(device), random_state=0
    ).fit()
    ready = ready_tensors(extractor, images)
    plain = torchvision.models.get_model(model_name).eval().requires_grad_(False)
    plain = plain.to(device, memory_format=torch.channels_last)
    networks = {
        ("skdeep", "eager"): extractor.model_,
        ("skdeep", "torch.compile"): torch.compile(extractor.model_),
        ("torchvision", "eager"): plain,
        ("torchvision", "torch.compile"): torch.compile(plain),
    }
    warm_ups, runs, failed = {}, {}, {}
    for key, module in networks.items():
        try:
            warm_ups[key] = warm_up_seconds(module, ready, device)
        except Exception as exc:  # a compiler error is a result, not a crash
            failed[key] = f"fails: {type(exc).__name__}"
            continue
        runs[key] = model_alone(module, ready, device, torch.float32, BATCH_SIZE)
    seconds = median_seconds(runs, repeats)
    eager = n_images / seconds[("skdeep", "eager")]
    rows = []
    for key in networks:
        if key in failed:
            rows.append([model_name, *key, failed[key], "", "", ""])
            continue
        rate = n_images / seconds[key]
        compiled = key[1] == "torch.compile"
        # Images after which the compiled run, warm-up included, is ahead of skdeep eager.
        gain = 1 / eager - 1 / rate
        break_even = (f"{warm_ups[key] / gain:,.0f}" if gain > 0 else "never") if compiled else ""
        rows.append(
            [
                model_name,
                *key,
                rate,
                f"{rate / eager:.2f}",
                warm_ups[key] if compiled else "",
                break_even,
            ]
        )
    return rows


def main() -> None:
    """Time the networks and write results/compile.md."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few images, for a smoke run")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    n_images, repeats = (128, 1) if args.quick else (512, 3)
    if device.type == "cuda" and not args.quick:
        n_images = 2048  # 512 images take a GPU a few milliseconds: too short to time
    report = Report("compile" + ("_quick" if args.quick else ""), device)
    rows = []
    for model_name in ["mobilenet_v2", "resnet18"]:
        rows += compile_rows(model_name, device, n_images, repeats)
    report.table(
        f"Network alone on ready tensors, 224 px float32, {n_images} images, median of "
        f"{repeats} ({machine()})",
        [
            "backbone",
            "network",
            "mode",
            "images/s",
            "x skdeep eager",
            "warm-up, s",
            "break-even, images",
        ],
        rows,
    )
    report.write()
    shutil.rmtree(os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)


if __name__ == "__main__":
    main()
