"""Fine-tuning on MNIST 5k: accuracy of the transfer-learning options, and speed
against skorch.

Run:  .venv/bin/python benchmarks/bench_fine_tune.py [--quick] [--device cuda]
(needs skorch for the speed table: ``pip install skorch``; ``make bench`` does it.)

1. Accuracy on a fixed stratified split (4,000 train / 1,000 test) with the offline
   ImageNet mobilenet_v2 weights at a reduced input size: logistic regression on raw
   pixels, the linear probe (FeatureExtractor + logistic regression),
   FineTuneClassifier(freeze="backbone") and full fine-tuning.
2. Seconds per epoch of FineTuneClassifier against skorch's NeuralNetClassifier on
   the same torchvision network (same weights and new head), data, batch size,
   optimizer (AdamW), learning-rate schedule (skdeep's default: 5% linear warm-up,
   then cosine decay, stepped per batch) and precision, in the same process.
   skorch gets the images already preprocessed into a float tensor (its usual
   input); skdeep starts from the uint8 images and preprocesses each batch itself.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch
from _common import machine, print_table
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skdeep import FeatureExtractor, FineTuneClassifier
from skdeep._device import cpu_has_native_bfloat16, resolve_device
from skdeep._images import as_image_source
from skdeep._training import warmup_cosine
from skdeep.backbones import load_backbone, replace_head
from skdeep.datasets import load_mnist_5k


def mnist_split():
    images, labels = load_mnist_5k()
    return train_test_split(images, labels, test_size=1000, stratify=labels, random_state=0)


def accuracy_table(device, image_size: int, epochs: int) -> float:
    X_train, X_test, y_train, y_test = mnist_split()
    rows = []

    def run(name, estimator, train, test):
        start = time.perf_counter()
        estimator.fit(train, y_train)
        accuracy = estimator.score(test, y_test)
        rows.append([name, 100 * accuracy, time.perf_counter() - start])
        return accuracy

    flat = lambda images: images.reshape(len(images), -1)  # noqa: E731
    run(
        "logistic regression, raw pixels",
        make_pipeline(StandardScaler(), LogisticRegression(max_iter=300)),
        flat(X_train),
        flat(X_test),
    )
    probe = run(
        "linear probe: FeatureExtractor + logistic regression",
        make_pipeline(
            FeatureExtractor(image_size=image_size, device=device),
            StandardScaler(),
            LogisticRegression(C=0.1, max_iter=500),
        ),
        X_train,
        X_test,
    )
    settings = dict(
        image_size=image_size, max_epochs=epochs, augment="crop", random_state=0, device=device
    )
    run(
        'FineTuneClassifier(freeze="backbone")',
        FineTuneClassifier(freeze="backbone", lr=1e-2, **settings),
        X_train,
        X_test,
    )
    full = run("FineTuneClassifier() (full)", FineTuneClassifier(**settings), X_train, X_test)
    print_table(
        f"MNIST 5k (4,000 train / 1,000 test), ImageNet mobilenet_v2 at {image_size} px, "
        f"{epochs} epochs, random crops ({machine()})",
        ["method", "test accuracy %", "fit + score seconds"],
        rows,
    )
    verdict = "beats" if full > probe else "does NOT beat"
    print(f"\nfull fine-tuning {verdict} the linear probe ({100 * full:.1f} vs {100 * probe:.1f})")
    return full


class _AutocastNet:
    """Mixin for skorch nets: train and evaluate under autocast, as skdeep does."""

    autocast_dtype = torch.float32

    def train_step_single(self, batch, **fit_params):
        with torch.autocast(self.device.split(":")[0], self.autocast_dtype, self._reduced):
            return super().train_step_single(batch, **fit_params)

    def evaluation_step(self, batch, training=False):
        with torch.autocast(self.device.split(":")[0], self.autocast_dtype, self._reduced):
            return super().evaluation_step(batch, training).float()

    @property
    def _reduced(self) -> bool:
        return self.autocast_dtype != torch.float32


def skorch_net(device, dtype, epochs: int, batch_size: int, lr: float, seed: int, n: int):
    from skorch import NeuralNetClassifier
    from skorch.callbacks import LRScheduler

    net_class = type("AutocastNeuralNetClassifier", (_AutocastNet, NeuralNetClassifier), {})
    module = load_backbone("mobilenet_v2", "IMAGENET1K_V1").module
    torch.manual_seed(seed)
    replace_head(module, 10)
    module = module.to(memory_format=torch.channels_last)
    net = net_class(
        module,
        criterion=torch.nn.CrossEntropyLoss,
        optimizer=torch.optim.AdamW,
        lr=lr,
        batch_size=batch_size,
        max_epochs=epochs,
        train_split=None,
        iterator_train__shuffle=True,
        callbacks=[
            LRScheduler(
                torch.optim.lr_scheduler.LambdaLR,
                lr_lambda=warmup_cosine(epochs * math.ceil(n / batch_size)),
                step_every="batch",
            )
        ],
        device=str(device),
        verbose=0,
    )
    net.autocast_dtype = dtype
    return net


def speed_table(device, image_size: int, epochs: int, seeds: list[int]) -> None:
    try:
        import skorch  # noqa: F401
    except ImportError:
        print("\n(skorch is not installed: `pip install skorch` for the speed comparison)")
        return
    X_train, X_test, y_train, y_test = mnist_split()
    batch_size, lr = 32, 1e-3
    # skorch's input: the same preprocessing, done once up front in float32.
    reference = FeatureExtractor(image_size=image_size, precision="float32").fit()
    ready = torch.cat([b.cpu() for b in reference._input_batches(as_image_source(X_train))])
    ready_test = torch.cat([b.cpu() for b in reference._input_batches(as_image_source(X_test))])
    reduced = torch.float16 if device.type == "cuda" else torch.bfloat16
    has_reduced = device.type == "cuda" or cpu_has_native_bfloat16()
    rows = []
    for dtype in [torch.float32, reduced] if has_reduced else [torch.float32]:
        precision = str(dtype).removeprefix("torch.")
        results = {"skorch": ([], [], []), "skdeep": ([], [], [])}  # epoch s, fit s, accuracy
        for seed in seeds:
            ours = FineTuneClassifier(
                image_size=image_size,
                max_epochs=epochs,
                batch_size=batch_size,
                lr=lr,
                scheduler="cosine",
                augment=False,
                weight_decay=0.01,  # AdamW's default, as skorch uses it
                precision=precision,
                device=str(device),
                random_state=seed,
            )
            start = time.perf_counter()
            ours.fit(X_train, y_train)
            fit_seconds = time.perf_counter() - start
            epoch_seconds = [record["seconds"] for record in ours.history_]
            _append(results["skdeep"], epoch_seconds, fit_seconds, ours.score(X_test, y_test))

            theirs = skorch_net(device, dtype, epochs, batch_size, lr, seed, len(X_train))
            start = time.perf_counter()
            theirs.fit(ready, torch.as_tensor(y_train))
            fit_seconds = time.perf_counter() - start
            accuracy = float((theirs.predict(ready_test) == y_test).mean())
            _append(results["skorch"], list(theirs.history[:, "dur"]), fit_seconds, accuracy)
        skorch_epoch = statistics.median(results["skorch"][0])
        for library, (epoch_seconds, fit_seconds, accuracies) in results.items():
            epoch = statistics.median(epoch_seconds)
            rows.append(
                [
                    library,
                    precision,
                    epoch,
                    statistics.mean(fit_seconds),
                    f"{100 * np.mean(accuracies):.1f} ± {100 * np.std(accuracies):.1f}",
                    f"{epoch / skorch_epoch:.2f}",
                ]
            )
    print_table(
        f"Fine-tuning speed: mobilenet_v2 (ImageNet) at {image_size} px, MNIST 4,000 images, "
        f"batch {batch_size}, AdamW lr {lr} warm-up + cosine, {epochs} epochs, seeds {seeds} "
        f"({machine()})",
        ["library", "precision", "s / epoch", "fit s", "test accuracy %", "epoch time vs skorch"],
        rows,
    )
    print(
        "(skdeep's fit time includes preprocessing every batch from uint8 and one pass to "
        "recalibrate batch norms; skorch's input was preprocessed beforehand)"
    )


def _append(result, epoch_seconds, fit_seconds, accuracy):
    result[0].extend(epoch_seconds)
    result[1].append(fit_seconds)
    result[2].append(accuracy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one epoch, for a smoke run")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    device = resolve_device(args.device)
    accuracy_table(device, args.image_size, epochs=1 if args.quick else 3)
    if args.quick:
        speed_table(device, args.image_size, epochs=1, seeds=[0])
    else:
        speed_table(device, args.image_size, epochs=2, seeds=[0, 1, 2, 3, 4])


if __name__ == "__main__":
    main()
