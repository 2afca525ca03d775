"""Feature extraction: throughput, reduced precision, timm backbones and memory.

Run:  .venv/bin/python benchmarks/bench_extraction.py [--quick] [--device cuda]
(``make bench`` runs all benchmarks after installing the comparison packages; this one
writes results/extraction.md.)

1. Images per second from uint8 arrays (n, 224, 224, 3) to feature rows, for
   mobilenet_v2 and resnet18, against baselines measured in the same process:
   - ceiling: skdeep's own network (batch norms folded) on ready, preprocessed
     tensors at the same precision, i.e. the model alone with no input pipeline;
   - torchvision model: the unmodified torchvision network on ready tensors;
   - naive loop: what most tutorials do (per-image PIL transforms, float32, batch 32);
   - img2vec_pytorch (resnet18 only, when installed; random weights are put in a
     temporary torch hub cache so that it runs offline).
2. bfloat16 against float32 with the real ImageNet mobilenet_v2 weights: speed,
   cosine similarity of the features and MNIST linear-probe accuracy.
3. timm backbones (ConvNeXt-T and ViT-S/16, random weights) against timm's own
   ``forward_features`` + ``forward_head(pre_logits=True)`` on ready tensors.
4. Peak memory while transforming 2,500 and 10,000 images (Fashion-MNIST when
   installed): it must not grow with the number of images beyond the output array.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import torch
import torchvision
from _common import PeakMemory, Report, cosine_similarity, machine, median_seconds, synchronize
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skdeep import FeatureExtractor
from skdeep._device import cpu_has_native_bfloat16
from skdeep._images import as_image_source
from skdeep.datasets import DatasetUnavailableError, load_fashion_mnist, load_mnist_5k


def naive_loop(model_name: str, device: torch.device):
    """Extract the tutorial way: PIL transforms image by image, float32, batches of 32."""
    weights = torchvision.models.get_model_weights(model_name).IMAGENET1K_V1
    model = torchvision.models.get_model(model_name).eval().to(device)
    if hasattr(model, "fc"):
        model.fc = torch.nn.Identity()
    else:
        model.classifier = torch.nn.Identity()
    transform = weights.transforms()

    def run(images: np.ndarray) -> np.ndarray:
        features = []
        with torch.no_grad():
            for start in range(0, len(images), 32):
                batch = torch.stack(
                    [transform(Image.fromarray(image)) for image in images[start : start + 32]]
                )
                features.append(model(batch.to(device)).cpu().numpy())
        return np.concatenate(features)

    return run


def img2vec_resnet18(device: torch.device, hub_dir: str):
    """Build img2vec_pytorch's resnet18 extractor (None when it is not installed)."""
    try:
        from img2vec_pytorch import Img2Vec
    except ImportError:
        return None
    os.makedirs(os.path.join(hub_dir, "checkpoints"), exist_ok=True)
    torch.save(
        torchvision.models.resnet18().state_dict(),
        os.path.join(hub_dir, "checkpoints", "resnet18-f37072fd.pth"),
    )
    previous = torch.hub.get_dir()
    torch.hub.set_dir(hub_dir)
    try:
        extractor = Img2Vec(cuda=device.type == "cuda", model="resnet18")
    finally:
        torch.hub.set_dir(previous)
    return lambda images: extractor.get_vec([Image.fromarray(image) for image in images])


def model_alone(module, ready: torch.Tensor, device, dtype, batch_size=64):
    """Run forward passes on already preprocessed input: the ceiling of any pipeline."""

    def run():
        reduced = dtype != torch.float32
        with torch.inference_mode(), torch.autocast(device.type, dtype, enabled=reduced):
            for start in range(0, len(ready), batch_size):
                module(ready[start : start + batch_size])
        synchronize(device)

    return run


def throughput(report: Report, device: torch.device, n_images: int, repeats: int) -> None:
    """Images per second of skdeep and its baselines, from uint8 arrays at 224 px."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n_images, 224, 224, 3), dtype=np.uint8)
    reduced = torch.float16 if device.type == "cuda" else torch.bfloat16
    has_reduced = device.type == "cuda" or cpu_has_native_bfloat16()
    precisions = [torch.float32, reduced] if has_reduced else [torch.float32]
    rows = []
    for model_name in ["mobilenet_v2", "resnet18"]:
        torch.manual_seed(0)
        runs, ceilings = {}, {}
        for dtype in precisions:
            name = str(dtype).removeprefix("torch.")
            extractor = FeatureExtractor(
                model_name, weights=None, precision=name, device=str(device), random_state=0
            ).fit()
            source = as_image_source(images)
            ready = torch.cat(list(extractor._input_batches(source, dtype=dtype)))
            runs[f"skdeep {name}"] = lambda e=extractor: e.transform(images)
            runs[f"ceiling {name}"] = model_alone(extractor.model_, ready, device, dtype)
            plain = torchvision.models.get_model(model_name).eval()
            plain = plain.to(device, memory_format=torch.channels_last)
            runs[f"torchvision model {name}"] = model_alone(plain, ready, device, dtype)
            ceilings[name] = f"ceiling {name}"
        naive = naive_loop(model_name, device)
        runs["naive loop float32"] = lambda naive=naive: naive(images)
        if model_name == "resnet18":
            with tempfile.TemporaryDirectory() as hub_dir:
                img2vec = img2vec_resnet18(device, hub_dir)
            if img2vec is not None:
                runs["img2vec_pytorch float32"] = lambda img2vec=img2vec: img2vec(images)
        seconds = median_seconds(runs, repeats)
        naive_rate = n_images / seconds["naive loop float32"]
        for label, value in seconds.items():
            rate = n_images / value
            precision = label.rsplit(" ", 1)[1]
            ceiling = n_images / seconds[ceilings[precision]] if precision in ceilings else None
            rows.append(
                [
                    model_name,
                    label,
                    rate,
                    f"{rate / ceiling:.2f}" if ceiling else "",
                    f"{rate / naive_rate:.2f}",
                ]
            )
    report.table(
        f"Throughput, uint8 arrays 224x224 -> feature rows, {n_images} images, median of "
        f"{repeats} ({machine()})",
        ["backbone", "method", "images/s", "x ceiling (same precision)", "x naive loop"],
        rows,
    )


def timm_throughput(report: Report, device: torch.device, n_images: int, repeats: int) -> None:
    """Images per second of timm backbones in skdeep against timm's own forward pass.

    The ceiling is timm's ``forward_features`` then ``forward_head(pre_logits=True)``
    (the penultimate features skdeep returns) on ready, preprocessed channels_last
    tensors, in float32, with the same random weights.
    """
    try:
        import timm
    except ImportError:
        report.note("(timm is not installed: `pip install timm` for the timm rows)")
        return
    images = np.random.default_rng(0).integers(0, 256, (n_images, 224, 224, 3), dtype=np.uint8)
    rows = []
    for name in ["convnext_tiny", "vit_small_patch16_224"]:
        extractor = FeatureExtractor(
            f"timm:{name}", weights=None, precision="float32", device=str(device), random_state=0
        ).fit()
        ready = torch.cat(list(extractor._input_batches(as_image_source(images))))
        plain = timm.create_model(name).eval().to(device, memory_format=torch.channels_last)
        plain.load_state_dict(extractor._random_weights)

        def timm_forward(batch, plain=plain):
            return plain.forward_head(plain.forward_features(batch), pre_logits=True)

        runs = {
            "skdeep float32": lambda e=extractor: e.transform(images),
            "timm forward_features (ceiling)": model_alone(
                timm_forward, ready, device, torch.float32
            ),
        }
        seconds = median_seconds(runs, repeats)
        ceiling = n_images / seconds["timm forward_features (ceiling)"]
        for label, value in seconds.items():
            rows.append(
                [f"timm:{name}", label, n_images / value, f"{n_images / value / ceiling:.2f}"]
            )
    report.table(
        f"timm backbones (random weights), uint8 arrays 224x224 -> penultimate features, "
        f"{n_images} images, median of {repeats} ({machine()})",
        ["backbone", "method", "images/s", "x ceiling"],
        rows,
    )


def precision_quality(report: Report, device: torch.device) -> None:
    """Speed and feature quality of reduced precision against float32 (real weights)."""
    if device.type == "cpu" and not cpu_has_native_bfloat16():
        report.note("(no native bfloat16 on this CPU: the reduced-precision table is skipped)")
        return
    reduced = "float16" if device.type == "cuda" else "bfloat16"
    images, labels = load_mnist_5k()
    X_train, X_test, y_train, y_test = train_test_split(
        images, labels, test_size=1000, stratify=labels, random_state=0
    )
    rows, features = [], {}
    for precision in ["float32", reduced]:
        extractor = FeatureExtractor(precision=precision, device=str(device)).fit()
        seconds = median_seconds({"t": lambda e=extractor: e.transform(X_test[:256])}, 3)["t"]
        train, test = extractor.transform(X_train), extractor.transform(X_test)
        features[precision] = test
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=500))
        accuracy = probe.fit(train, y_train).score(test, y_test)
        rows.append([precision, 256 / seconds, 100 * accuracy])
    cosine = cosine_similarity(features["float32"], features[reduced])
    rows[1].append(f"{cosine.min():.4f} / {cosine.mean():.4f}")
    rows[0].append("")
    speedup = rows[1][1] / rows[0][1]
    rows[1][1] = f"{rows[1][1]:.0f} ({speedup:.2f}x)"
    report.table(
        "Reduced precision, ImageNet mobilenet_v2 at 224 px, MNIST 5k linear probe "
        "(4,000 train / 1,000 test)",
        ["precision", "images/s", "probe accuracy %", "cosine to float32 (min / mean)"],
        rows,
    )


def memory(report: Report, device: torch.device, sizes: list[int]) -> None:
    """Peak resident memory while transforming more and more images."""
    try:
        pool, _ = load_fashion_mnist("train")
        data = "Fashion-MNIST"
    except DatasetUnavailableError:
        pool = np.tile(load_mnist_5k()[0], (12, 1, 1))
        data = "MNIST 5k, tiled"
    extractor = FeatureExtractor(device=str(device)).fit()
    extractor.transform(pool[:64])  # warm-up: allocator pools, kernels
    rows = []
    for n in sizes:
        images = np.ascontiguousarray(pool[:n])
        with PeakMemory() as peak:
            features = extractor.transform(images)
        output_mb = features.nbytes / 2**20
        peak_mb = peak.peak_bytes / 2**20
        rows.append([n, images.nbytes / 2**20, output_mb, peak_mb, peak_mb - output_mb])
        del features
    report.table(
        f"Peak resident memory while transforming ({data} 28x28, mobilenet_v2 at 224 px, MiB)",
        ["images", "input", "output array", "peak above start", "peak minus output"],
        rows,
    )


def main() -> None:
    """Run the three tables and write results/extraction.md."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer images, for a smoke run")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    from skdeep._device import resolve_device

    device = resolve_device(args.device)
    report = Report("extraction" + ("_quick" if args.quick else ""), device, ("img2vec_pytorch",))
    throughput(report, device, n_images=64 if args.quick else 256, repeats=1 if args.quick else 3)
    timm_throughput(
        report, device, n_images=32 if args.quick else 128, repeats=1 if args.quick else 3
    )
    precision_quality(report, device)
    memory(report, device, [500, 2000] if args.quick else [2500, 10000])
    report.write()


if __name__ == "__main__":
    main()
