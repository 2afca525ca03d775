"""Domain adaptation: MNIST (labeled source) -> scikit-learn's optdigits (unlabeled target).

Run:  .venv/bin/python benchmarks/bench_domain_adaptation.py [--quick] [--device cuda]
(needs skada for its DAN row: ``pip install skada``; ``make bench`` does it.)

Source: the 5,000 MNIST digits (28x28). Target: the 1,797 optdigits of
``sklearn.datasets.load_digits`` (8x8, 17 grey levels), brought to 28x28 uint8. Target
labels are never given to ``fit``; they only score the models. Every deep model starts
from the offline ImageNet mobilenet_v2 weights at the same input size, batch size,
optimizer and number of epochs:

(a) logistic regression on raw pixels, trained on the source;
(b) FeatureExtractor + logistic regression, trained on the source;
(c) FineTuneClassifier on the source only;
(d) DomainAdaptedClassifier (DAN: multi-kernel MMD on penultimate features and logits);
(e) skada's DAN (skada.deep.DAN) on the same network, data and epochs.

Hyper-parameters are fixed in advance, not tuned on target labels: skdeep's defaults
(mmd_weight=1, ramp schedule, DAN's kernels) and skada's defaults (reg=1) with the
same training settings as (c). Mean and spread of target accuracy over seeds, and the
MMD between source and target penultimate features for (c) and (d).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _common import machine, print_table
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skdeep import DomainAdaptedClassifier, FeatureExtractor, FineTuneClassifier
from skdeep._device import resolve_device
from skdeep._images import as_image_source
from skdeep.backbones import load_backbone, replace_head
from skdeep.datasets import load_digits_images, load_mnist_5k
from skdeep.losses import mmd


def feature_mmd(clf, X_source, X_target, n: int = 600) -> float:
    rng = np.random.default_rng(0)
    source = clf.transform(X_source[rng.choice(len(X_source), n, replace=False)])
    target = clf.transform(X_target[rng.choice(len(X_target), n, replace=False)])
    return mmd(torch.from_numpy(source).double(), torch.from_numpy(target).double()).item()


class _SkadaModule(torch.nn.Module):
    """skada calls its network with a sample_weight keyword; torchvision's don't take it."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, sample_weight=None):
        return self.net(x)


def skada_dan(settings, seed, X_source, y_source, X_target, device):
    """Skada's DAN on the same network, fed the same preprocessed tensors."""
    from skada.deep import DAN

    reference = FeatureExtractor(image_size=settings["image_size"], precision="float32").fit()

    def ready(images):
        return torch.cat([b.cpu() for b in reference._input_batches(as_image_source(images))])

    torch.manual_seed(seed)
    module = load_backbone("mobilenet_v2", "IMAGENET1K_V1").module
    replace_head(module, 10)
    net = DAN(
        _SkadaModule(module),
        layer_name="net.classifier.0",  # its output is the penultimate features
        reg=1.0,
        batch_size=settings["batch_size"],
        max_epochs=settings["max_epochs"],
        optimizer=torch.optim.AdamW,
        lr=settings["lr"],
        train_split=None,
        device=str(device),
        verbose=0,
    )
    X = torch.cat([ready(X_source), ready(X_target)]).numpy()
    y = np.r_[y_source, -np.ones(len(X_target), dtype=np.int64)]
    domain = np.r_[np.ones(len(X_source), dtype=np.int64), -np.ones(len(X_target), np.int64)]
    net.fit(X, y, sample_domain=domain)
    target_input = ready(X_target).numpy()
    return lambda y_true: float(
        (
            net.predict(target_input, sample_domain=-np.ones(len(X_target), np.int64)) == y_true
        ).mean()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, one epoch")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    device = resolve_device(args.device)
    seeds = [0] if args.quick else [0, 1, 2]
    epochs = 1 if args.quick else args.epochs

    X_source, y_source = load_mnist_5k()
    X_target, y_target = load_digits_images(size=28)
    settings = dict(
        image_size=args.image_size,
        max_epochs=epochs,
        batch_size=32,
        lr=1e-3,
        augment="crop",
        device=str(device),
    )
    accuracies: dict[str, list[float]] = {}
    seconds: dict[str, list[float]] = {}
    discrepancy: dict[str, list[float]] = {}

    def record(name, accuracy, started):
        accuracies.setdefault(name, []).append(100 * accuracy)
        seconds.setdefault(name, []).append(time.perf_counter() - started)

    flat = lambda images: images.reshape(len(images), -1)  # noqa: E731
    start = time.perf_counter()
    pixels = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300))
    pixels.fit(flat(X_source), y_source)
    record("(a) logistic regression, raw pixels", pixels.score(flat(X_target), y_target), start)

    start = time.perf_counter()
    probe = make_pipeline(
        FeatureExtractor(image_size=args.image_size, device=str(device)),
        StandardScaler(),
        LogisticRegression(C=0.1, max_iter=500),
    )
    probe.fit(X_source, y_source)
    record("(b) FeatureExtractor + logistic regression", probe.score(X_target, y_target), start)

    for seed in seeds:
        start = time.perf_counter()
        source_only = FineTuneClassifier(random_state=seed, **settings).fit(X_source, y_source)
        record("(c) FineTuneClassifier, source only", source_only.score(X_target, y_target), start)
        discrepancy.setdefault("(c)", []).append(feature_mmd(source_only, X_source, X_target))

        start = time.perf_counter()
        adapted = DomainAdaptedClassifier(random_state=seed, **settings)
        adapted.fit(X_source, y_source, X_target=X_target)
        record("(d) DomainAdaptedClassifier", adapted.score(X_target, y_target), start)
        discrepancy.setdefault("(d)", []).append(feature_mmd(adapted, X_source, X_target))

        try:
            start = time.perf_counter()
            score = skada_dan(settings, seed, X_source, y_source, X_target, device)
            record("(e) skada DAN", score(y_target), start)
        except ImportError:
            pass
        print(f"seed {seed} done", flush=True)

    rows = [
        [name, np.mean(values), np.std(values), len(values), np.mean(seconds[name])]
        for name, values in accuracies.items()
    ]
    print_table(
        f"MNIST 5k -> optdigits (target labels unseen), mobilenet_v2 ImageNet at "
        f"{args.image_size} px, {epochs} epochs, batch 32, AdamW 1e-3 ({machine()})",
        ["method", "target accuracy % (mean)", "std", "seeds", "seconds per fit"],
        rows,
    )
    print_table(
        "MMD between source and target penultimate features (multi-kernel, 600 images each)",
        ["model", "MMD (mean over seeds)"],
        [
            ["(c) source only", np.mean(discrepancy["(c)"])],
            ["(d) adapted", np.mean(discrepancy["(d)"])],
        ],
    )
    gain = np.mean(accuracies["(d) DomainAdaptedClassifier"]) - np.mean(
        accuracies["(c) FineTuneClassifier, source only"]
    )
    print(f"\n(d) - (c) = {gain:+.1f} points of mean target accuracy")


if __name__ == "__main__":
    main()
