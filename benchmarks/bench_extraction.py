"""Feature extraction: throughput, reduced precision, int8, timm backbones and memory.

Run:  .venv/bin/python benchmarks/bench_extraction.py [--quick] [--device cuda]
      [--sections throughput timm precision int8 memory]
(``make bench`` runs all benchmarks after installing the comparison packages; this one
writes results/extraction.md, or results/extraction_<sections>.md for some sections.)

1. throughput: images per second from uint8 arrays (n, 224, 224, 3) to feature rows,
   for mobilenet_v2 and resnet18, against baselines measured in the same process:
   - ceiling: skdeep's own network (batch norms folded) on ready, preprocessed
     tensors at the same precision, i.e. the model alone with no input pipeline;
   - torchvision model: the unmodified torchvision network on ready tensors;
   - naive loop: what most tutorials do (per-image PIL transforms, float32, batch 32);
   - img2vec_pytorch (resnet18 only, when installed; random weights are put in a
     temporary torch hub cache so that it runs offline).
2. timm: timm backbones (ConvNeXt-T and ViT-S/16, random weights) against timm's own
   ``forward_features`` + ``forward_head(pre_logits=True)`` on ready tensors.
3. precision: bfloat16 against float32 with the real ImageNet mobilenet_v2 weights:
   speed, cosine similarity of the features and MNIST linear-probe accuracy.
4. int8 (CPU): speed against float32, end to end and network alone, with the
   calibration cost; quality with the real mobilenet_v2 weights (cosine to float32,
   ImageNet top-1 on the foolbox photos, MNIST linear probe). Baselines: PyTorch's FX
   quantization with its x86 defaults, and torchao's PT2E flow compiled by inductor
   (when torchao is installed). The CPU's instruction sets head the tables.
5. memory: peak memory while transforming 2,500 and 10,000 images (Fashion-MNIST when
   installed): it must not grow with the number of images beyond the output array.
   With ``--device cuda`` the table adds the GPU's peak allocated memory (PyTorch's
   allocator), which the host's resident memory does not include.
6. pipeline: the input pipeline reading ahead (``skdeep._feed.AHEAD`` batches, decoded
   in a thread, staged through pinned buffers on CUDA) against reading each batch when
   the network needs it (``AHEAD = 0``), same process, interleaved runs: from uint8
   arrays and from JPEG files (decoded in the calling process, ``num_workers=0``), with
   the model alone on ready tensors as the ceiling.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import tempfile
import time

import numpy as np
import torch
import torchvision
from _common import (
    PeakMemory,
    Report,
    cosine_similarity,
    cpu_summary,
    machine,
    median_seconds,
    ready_tensors,
    report_name,
    synchronize,
)
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skdeep import FeatureExtractor, _feed, _quantize
from skdeep._device import cpu_has_native_bfloat16
from skdeep._images import as_image_source
from skdeep._network import LOGITS, PENULTIMATE, find_head, set_submodule
from skdeep.backbones import load_backbone
from skdeep.datasets import (
    DatasetUnavailableError,
    load_fashion_mnist,
    load_mnist_5k,
    load_sample_photos,
)


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
            ready = ready_tensors(extractor, images, dtype)
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
        ready = ready_tensors(extractor, images)
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
    on_gpu = device.type == "cuda"
    rows = []
    for n in sizes:
        images = np.ascontiguousarray(pool[:n])
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(device)
        with PeakMemory() as peak:
            features = extractor.transform(images)
        output_mb = features.nbytes / 2**20
        peak_mb = peak.peak_bytes / 2**20
        row = [n, images.nbytes / 2**20, output_mb, peak_mb, peak_mb - output_mb]
        if on_gpu:  # the host's resident memory does not see the GPU's
            row.append(torch.cuda.max_memory_allocated(device) / 2**20)
        rows.append(row)
        del features
    header = ["images", "input", "output array", "peak above start", "peak minus output"]
    measured = "Peak host resident and GPU memory" if on_gpu else "Peak resident memory"
    report.table(
        f"{measured} while transforming ({data} 28x28, mobilenet_v2 at 224 px, MiB)",
        header + (["GPU peak allocated"] if on_gpu else []),
        rows,
    )


# ----------------------------------------------------------------------------------------
# int8
# ----------------------------------------------------------------------------------------


def _padded_batches(extractor: FeatureExtractor, images, batch_size: int = 64):
    """Yield (ready batch padded to ``batch_size``, rows to keep): one shape to compile."""
    for batch in extractor._input_batches(as_image_source(images)):
        count = len(batch)
        if count < batch_size:
            batch = torch.cat([batch, batch[-1:].expand(batch_size - count, -1, -1, -1)])
        yield batch, count


def _outputs(network, extractor: FeatureExtractor, images) -> dict[str, np.ndarray]:
    """Run a network returning {layer: tensor} on images preprocessed by ``extractor``."""
    parts: dict[str, list] = {}
    with torch.inference_mode():
        for batch, count in _padded_batches(extractor, images, extractor.batch_size):
            for layer, value in network(batch).items():
                parts.setdefault(layer, []).append(value[:count].float().numpy())
    return {layer: np.concatenate(values) for layer, values in parts.items()}


def has_torchao() -> bool:
    """Whether torchao (for its PT2E quantization rows) is installed."""
    return importlib.util.find_spec("torchao") is not None


def _observe(prepared, calibration: torch.Tensor, batch_size: int = 64) -> None:
    """Run the calibration tensors through a network with observers, in batches."""
    with torch.no_grad():
        for start in range(0, len(calibration), batch_size):
            prepared(calibration[start : start + batch_size])


def fx_x86_defaults(model: torch.nn.Module, layers: list[str], calibration: torch.Tensor):
    """PyTorch's FX quantization with its x86 defaults: the issue's naive try."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    graph = _quantize.tapped_graph(model, layers)
    prepared = prepare_fx(graph.graph, get_default_qconfig_mapping("x86"), (calibration[:1],))
    _observe(prepared, calibration.contiguous())
    return _quantize.TappedGraph(convert_fx(prepared).eval(), graph.names)


class _PenultimateAndLogits(torch.nn.Module):
    """A torchvision classifier that returns its penultimate features and its logits."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        head_name, head = find_head(model)
        self.body = copy.deepcopy(model)
        # Out-of-place activations: tried for ResNet-18, on which torchao's quantizer
        # fails all the same (see the results); MobileNet-V2 was measured this way.
        for module in self.body.modules():
            if hasattr(module, "inplace"):
                module.inplace = False
        set_submodule(self.body, head_name, torch.nn.Identity())
        self.head = head

    def forward(self, x):
        features = self.body(x)
        return {PENULTIMATE: features, LOGITS: self.head(features)}


def torchao_pt2e(model: torch.nn.Module, layers: list[str], calibration: torch.Tensor):
    """Torchao's PT2E flow (X86InductorQuantizer defaults), compiled by inductor.

    The network (penultimate features and logits of ``model``) is exported whole, as in
    torchao's tutorial. The first call of what this returns compiles it (the warm-up).
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    network = _PenultimateAndLogits(model).eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    exported = torch.export.export(
        network, (calibration[:2],), dynamic_shapes=({0: batch},)
    ).module()
    quantizer = x86.X86InductorQuantizer().set_global(
        x86.get_default_x86_inductor_quantization_config()
    )
    prepared = prepare_pt2e(exported, quantizer)
    _observe(prepared, calibration)
    compiled = torch.compile(convert_pt2e(prepared))
    return lambda batch: {layer: compiled(batch)[layer] for layer in layers}


def int8_speed(report: Report, device: torch.device, n_images: int, repeats: int) -> None:
    """int8 against float32 on the CPU, end to end from uint8 arrays and network alone."""
    if device.type != "cpu":
        report.note("(int8 runs on the CPU only: the int8 tables are skipped on CUDA)")
        return
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n_images, 224, 224, 3), dtype=np.uint8)
    calibration_images = rng.integers(0, 256, (64, 224, 224, 3), dtype=np.uint8)
    rows = []
    for model_name in ["mobilenet_v2", "resnet18"]:
        params = dict(backbone=model_name, weights=None, random_state=0)
        float32 = FeatureExtractor(**params, precision="float32").fit()
        start = time.perf_counter()
        int8 = FeatureExtractor(**params, precision="int8").fit(calibration_images)
        one_off = {"skdeep int8": time.perf_counter() - start}
        ready = ready_tensors(float32, images)
        runs = {
            "skdeep float32": lambda e=float32: e.transform(images),
            "skdeep int8": lambda e=int8: e.transform(images),
            "float32 network alone (ready tensors)": model_alone(
                float32.model_, ready, device, torch.float32
            ),
            "int8 network alone (ready tensors)": model_alone(
                int8.model_, ready, device, torch.float32
            ),
        }
        plain = torchvision.models.get_model(model_name).eval()
        plain.load_state_dict(float32._random_weights)
        calibration = ready_tensors(float32, calibration_images)
        start = time.perf_counter()
        label = "torchao PT2E + torch.compile alone (ready tensors)"
        try:
            if has_torchao():
                pt2e = torchao_pt2e(plain, [PENULTIMATE], calibration)
                model_alone(pt2e, ready[:64], device, torch.float32)()  # compiles
                one_off[label] = time.perf_counter() - start
                runs[label] = model_alone(pt2e, ready, device, torch.float32)
        except Exception as exc:  # report what torchao cannot do rather than stop
            report.note(f"torchao PT2E failed on {model_name}: {type(exc).__name__}: {exc}")
        seconds = median_seconds(runs, repeats)
        for label, value in seconds.items():
            skdeep = label.startswith("skdeep")
            base = "skdeep float32" if skdeep else "float32 network alone (ready tensors)"
            cost = f"{one_off[label]:.1f}" if label in one_off else ""
            rows.append([model_name, label, n_images / value, f"{seconds[base] / value:.2f}", cost])
    report.table(
        f"int8 against float32, uint8 arrays 224x224 -> penultimate features, {n_images} "
        f"images, median of {repeats}, random weights ({cpu_summary()})",
        ["backbone", "method", "images/s", "x float32 (same path)", "one-off s"],
        rows,
    )
    report.note(
        "One-off: skdeep's calibration in fit (64 images); for PT2E, export, calibration "
        "(64 images), conversion and the first compiled call. Without VNNI, AVX2 sums "
        "pairs of uint8 x int8 products in int16, so skdeep rounds weights to [-64, 64]; "
        "CPUs with VNNI or AMX were not available to measure."
    )


def int8_quality(report: Report) -> None:
    """Feature quality of int8 methods against float32, real mobilenet_v2 weights.

    Each method is calibrated twice: on 10 of the foolbox photos (cosine to float32 on
    the 10 others, top-1 on all 20) and on 256 MNIST training images (linear probe).
    """
    try:
        paths, labels = load_sample_photos("imagenet")
        mnist, mnist_labels = load_mnist_5k()
    except DatasetUnavailableError as exc:
        report.note(f"(int8 quality skipped: {exc})")
        return
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    X_train, X_test, y_train, y_test = train_test_split(
        mnist, mnist_labels, test_size=1000, stratify=mnist_labels, random_state=0
    )
    layers = [PENULTIMATE, LOGITS]
    reference = FeatureExtractor(layers=layers, pooling=None, precision="float32").fit()
    plain = load_backbone(reference.backbone, reference.weights).module.eval()
    width = plain.classifier[1].in_features

    def split(rows):
        return np.split(rows, [width], axis=1)  # penultimate features, logits

    def skdeep_int8(calibration_images):
        extractor = FeatureExtractor(layers=layers, pooling=None, precision="int8")
        extractor.fit(calibration_images)
        return lambda images: split(extractor.transform(images))

    def on_graph(build):
        def calibrated(calibration_images):
            network = build(plain, layers, ready_tensors(reference, calibration_images))
            return lambda images: [_outputs(network, reference, images)[k] for k in layers]

        return calibrated

    methods = {
        "float32": lambda _: lambda images: split(reference.transform(images)),
        "skdeep int8": skdeep_int8,
        "PyTorch FX, its x86 defaults": on_graph(fx_x86_defaults),
    }
    if has_torchao():
        methods["torchao PT2E + torch.compile"] = on_graph(torchao_pt2e)
    rows, exact = [], {}
    for name, calibrate in methods.items():
        photo_features, photo_logits = calibrate(photos[:10])(photos)
        run = calibrate(X_train[:256])
        (train, _), (test, _) = run(X_train), run(X_test)
        exact = exact or {"photos": photo_features[10:], "mnist": test}
        photo_cosine = cosine_similarity(exact["photos"], photo_features[10:])
        mnist_cosine = cosine_similarity(exact["mnist"], test)
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=500))
        rows.append(
            [
                name,
                f"{photo_cosine.mean():.4f} / {photo_cosine.min():.4f}",
                f"{int((photo_logits.argmax(1) == labels).sum())}/20",
                100 * probe.fit(train, y_train).score(test, y_test),
                f"{mnist_cosine.mean():.4f} / {mnist_cosine.min():.4f}",
            ]
        )
    report.table(
        "int8 quality, ImageNet mobilenet_v2 at 224 px: cosine to float32 of the penultimate "
        "features of 10 held-out foolbox photos (calibrated on the 10 others), top-1 on all "
        "20, MNIST 5k linear probe (4,000 train / 1,000 test, calibrated on 256 training "
        "images)",
        ["method", "photos cosine mean / min", "top-1", "MNIST probe %", "MNIST cosine mean / min"],
        rows,
    )


def pipeline(report: Report, device: torch.device, n_images: int, repeats: int) -> None:
    """Time reading ahead against reading on demand, from arrays and from JPEG files."""
    default = _feed.AHEAD
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n_images, 224, 224, 3), dtype=np.uint8)
    precisions = ["float32", "float16"] if device.type == "cuda" else ["float32"]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for index, image in enumerate(images):
            path = os.path.join(folder, f"{index}.jpg")
            Image.fromarray(image).resize((256, 256)).save(path, quality=90)
            paths.append(path)
        for precision in precisions:
            extractor = FeatureExtractor(
                "mobilenet_v2", weights=None, precision=precision, device=str(device),
                random_state=0,
            ).fit()  # fmt: skip
            dtype = getattr(torch, precision)
            ready = ready_tensors(extractor, images, dtype)

            def transform(inputs, ahead, extractor=extractor):
                _feed.AHEAD = ahead
                try:
                    return extractor.transform(inputs)
                finally:
                    _feed.AHEAD = default

            runs = {
                ("arrays", "ahead"): lambda: transform(images, default),
                ("arrays", "on demand"): lambda: transform(images, 0),
                ("JPEG files", "ahead"): lambda: transform(paths, default),
                ("JPEG files", "on demand"): lambda: transform(paths, 0),
                ("ready tensors", "model alone"): model_alone(
                    extractor.model_, ready, device, dtype
                ),
            }
            seconds = median_seconds(runs, repeats)
            ceiling = n_images / seconds[("ready tensors", "model alone")]
            for (inputs, reading), value in seconds.items():
                rate = n_images / value
                on_demand = seconds.get((inputs, "on demand"))
                rows.append(
                    [precision, inputs, reading, rate, f"{rate / ceiling:.2f}",
                     f"{on_demand / value:.2f}" if on_demand else ""]
                )  # fmt: skip
    report.table(
        f"Input pipeline, mobilenet_v2 at 224 px, {n_images} images, batch 64, reading "
        f"{default} batches ahead or none, median of {repeats} ({machine()})",
        ["precision", "input", "reading", "images/s", "x ceiling", "x on demand"],
        rows,
    )


SECTIONS = ("throughput", "timm", "precision", "int8", "memory", "pipeline")


def main() -> None:
    """Run the tables and write results/extraction.md (or extraction_<sections>.md)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer images, for a smoke run")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--sections", nargs="+", choices=SECTIONS, default=SECTIONS, help="tables to run"
    )
    args = parser.parse_args()
    from skdeep._device import resolve_device

    device = resolve_device(args.device)
    name = report_name("extraction", args.sections, SECTIONS, args.quick)
    report = Report(name, device, ("img2vec_pytorch", "torchao"))
    n_images, repeats = (64, 1) if args.quick else (256, 3)
    if device.type == "cuda" and not args.quick:
        n_images = 1024  # 256 images take a GPU a few milliseconds: too short to time
    if "throughput" in args.sections:
        throughput(report, device, n_images, repeats)
    if "timm" in args.sections:
        timm_throughput(report, device, n_images // 2, repeats)
    if "precision" in args.sections:
        precision_quality(report, device)
    if "int8" in args.sections:
        int8_speed(report, device, n_images, repeats)
        if device.type == "cpu":
            int8_quality(report)
    if "memory" in args.sections:
        memory(report, device, [500, 2000] if args.quick else [2500, 10000])
    if "pipeline" in args.sections:
        pipeline(report, device, n_images, repeats)
    report.write()


if __name__ == "__main__":
    main()
