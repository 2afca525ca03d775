"""Fine-tuning: accuracy against the linear probe, and speed against skorch.

Run:  .venv/bin/python benchmarks/bench_fine_tune.py [--quick] [--device cuda]
      [--sections accuracy speed precision]
(``make bench`` runs it after installing skorch; it writes results/fine_tune.md, or
results/fine_tune_<sections>.md for some sections.)

1. Accuracy with FineTuneClassifier's defaults (only ``image_size`` and
   ``max_epochs`` are set) against the linear probe (FeatureExtractor + logistic
   regression) and logistic regression on raw pixels, with the offline ImageNet
   mobilenet_v2 weights, on MNIST with 1,000 and 4,000 training images and
   Fashion-MNIST with 4,000 (Debian's ``dataset-fashion-mnist``).
2. Seconds per epoch of FineTuneClassifier against skorch's NeuralNetClassifier on
   the same network, data and settings. skorch gets every training setting skdeep
   uses: skdeep's own optimizer (fused AdamW, no weight decay on biases and norms),
   the warm-up + cosine schedule stepped per batch, channels_last batches, autocast
   at the same precision (with skdeep's float32 depthwise convolutions in bfloat16 on
   a CPU), and the batch-norm recalibration pass after training (a callback). What
   differs: skorch gets the images already preprocessed into a float tensor, while
   skdeep starts from the uint8 images and preprocesses each batch itself. The
   ceiling of both, "bare step", is a plain loop of the same training steps
   (optimizer, schedule, precision) over batches of that preprocessed tensor already
   on the device: no loader, no per-batch work on the host.
3. Where bfloat16 trains faster than float32 on this CPU (one training step of
   MobileNet-V2 and -V3, EfficientNet-B0 and ResNet-18 at 32 to 224 px; bfloat16 as
   plain autocast runs it and as skdeep trains), and whether ``precision="auto"``
   picks the faster one; skipped on a CPU without native bfloat16.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import time

import numpy as np
import torch
from _common import Report, machine, report_name, synchronize
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skdeep import FeatureExtractor, FineTuneClassifier
from skdeep._device import (
    cpu_has_native_bfloat16,
    float32_depthwise_convolutions,
    resolve_device,
    resolve_precision,
)
from skdeep._images import as_image_source
from skdeep._network import replace_head
from skdeep._training import (
    make_optimizer,
    optimizer_of_groups,
    parameter_groups,
    recalibrate_batch_norm,
    warmup_cosine,
)
from skdeep.backbones import load_backbone
from skdeep.datasets import DatasetUnavailableError, load_fashion_mnist, load_mnist_5k


def mnist_split():
    """Split MNIST 5k into 4,000 training and 1,000 test images (stratified)."""
    images, labels = load_mnist_5k()
    return train_test_split(images, labels, test_size=1000, stratify=labels, random_state=0)


def data_sets(quick: bool) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Return the data sets of the accuracy table: (name, X_train, X_test, y_train, y_test)."""
    X_train, X_test, y_train, y_test = mnist_split()
    small, _, small_labels, _ = train_test_split(
        X_train, y_train, train_size=1000, stratify=y_train, random_state=0
    )
    sets = [("MNIST", small, X_test, small_labels, y_test)]
    if quick:
        return sets
    sets.append(("MNIST", X_train, X_test, y_train, y_test))
    try:
        images, labels = load_fashion_mnist("train")
        test_images, test_labels = load_fashion_mnist("test")
    except DatasetUnavailableError as exc:
        print(f"(Fashion-MNIST skipped: {exc})")
        return sets
    train, _, train_labels, _ = train_test_split(
        images, labels, train_size=4000, stratify=labels, random_state=0
    )
    test, _, test_y, _ = train_test_split(
        test_images, test_labels, train_size=2000, stratify=test_labels, random_state=0
    )
    sets.append(("Fashion-MNIST", train, test, train_labels, test_y))
    return sets


def accuracy_table(report: Report, device, image_size: int, epochs: int, quick: bool) -> None:
    """Fine-tuning with defaults against the linear probe on each data set."""
    rows, verdicts = [], []
    for name, X_train, X_test, y_train, y_test in data_sets(quick):
        scores = {}
        flat = lambda images: images.reshape(len(images), -1)  # noqa: E731
        methods = [
            (
                "logistic regression, raw pixels",
                make_pipeline(StandardScaler(), LogisticRegression(max_iter=300)),
                flat,
            ),
            (
                "linear probe: FeatureExtractor + logistic regression",
                make_pipeline(
                    FeatureExtractor(image_size=image_size, device=device),
                    StandardScaler(),
                    LogisticRegression(C=0.1, max_iter=500),
                ),
                None,
            ),
            (
                "FineTuneClassifier, defaults",
                FineTuneClassifier(
                    image_size=image_size, max_epochs=epochs, device=device, random_state=0
                ),
                None,
            ),
        ]
        for method, estimator, prepare in methods:
            prepare = prepare or (lambda images: images)
            start = time.perf_counter()
            estimator.fit(prepare(X_train), y_train)
            scores[method] = 100 * estimator.score(prepare(X_test), y_test)
            seconds = time.perf_counter() - start
            rows.append([name, len(X_train), method, scores[method], seconds])
        probe = scores["linear probe: FeatureExtractor + logistic regression"]
        tuned = scores["FineTuneClassifier, defaults"]
        verdict = "beats" if tuned > probe else "does NOT beat"
        verdicts.append(
            f"{name} ({len(X_train)} images): fine-tuning {verdict} the probe "
            f"({tuned:.1f} vs {probe:.1f} %)"
        )
    report.table(
        f"Accuracy: ImageNet mobilenet_v2 at {image_size} px, FineTuneClassifier defaults "
        f"with max_epochs={epochs} ({machine()})",
        ["data", "train images", "method", "test accuracy %", "fit + score s"],
        rows,
    )
    report.note("\n".join(f"- {line}" for line in verdicts))


def skorch_net(device, dtype, epochs: int, batch_size: int, lr: float, seed: int, n: int):
    """Build a skorch classifier with every training setting skdeep uses."""
    from skorch import NeuralNetClassifier
    from skorch.callbacks import Callback, LRScheduler

    class SkdeepSettings(NeuralNetClassifier):
        """skorch, with skdeep's optimizer, channels_last batches and autocast."""

        autocast_dtype = torch.float32
        head_name = "classifier.1"
        decay = 1e-4

        def initialize_optimizer(self, *args, **kwargs):
            head = self.module_.get_submodule(self.head_name)
            self.optimizer_ = make_optimizer("adamw", self.module_, head, lr, lr, self.decay)
            return self

        def train_step_single(self, batch, **fit_params):
            with (
                float32_depthwise_convolutions(self.module_, device, self.autocast_dtype),
                torch.autocast(device.type, self.autocast_dtype, self._reduced),
            ):
                return super().train_step_single(batch, **fit_params)

        def evaluation_step(self, batch, training=False):
            with torch.autocast(device.type, self.autocast_dtype, self._reduced):
                return super().evaluation_step(batch, training).float()

        @property
        def _reduced(self) -> bool:
            return self.autocast_dtype != torch.float32

    class RecalibrateBatchNorm(Callback):
        """skdeep's batch-norm recalibration pass after training."""

        def on_train_end(self, net, X=None, y=None, **kwargs):
            batches = (
                X[start : start + batch_size].to(device, memory_format=torch.channels_last)
                for start in range(0, len(X), batch_size)
            )
            recalibrate_batch_norm(net.module_, [], batches, device, dtype)

    def channels_last(samples):
        images = torch.stack([image for image, _ in samples])
        labels = torch.stack([torch.as_tensor(label) for _, label in samples])
        return images.contiguous(memory_format=torch.channels_last), labels

    module = load_backbone("mobilenet_v2", "IMAGENET1K_V1").module
    torch.manual_seed(seed)
    replace_head(module, 10)
    net = SkdeepSettings(
        module.to(memory_format=torch.channels_last),
        criterion=torch.nn.CrossEntropyLoss,
        lr=lr,
        batch_size=batch_size,
        max_epochs=epochs,
        train_split=None,
        iterator_train__shuffle=True,
        iterator_train__collate_fn=channels_last,
        iterator_valid__collate_fn=channels_last,
        callbacks=[
            LRScheduler(
                torch.optim.lr_scheduler.LambdaLR,
                lr_lambda=warmup_cosine(epochs * math.ceil(n / batch_size)),
                step_every="batch",
            ),
            RecalibrateBatchNorm(),
        ],
        device=str(device),
        verbose=0,
    )
    net.autocast_dtype = dtype
    return net


def bare_step_epochs(device, dtype, epochs, batch_size, lr, seed, ready, labels) -> list[float]:
    """Seconds per epoch of the training steps alone, on ready tensors on the device."""
    module = load_backbone("mobilenet_v2", "IMAGENET1K_V1").module
    torch.manual_seed(seed)
    head_name = replace_head(module, 10)
    model = module.to(device, memory_format=torch.channels_last).train()
    head = model.get_submodule(head_name)
    optimizer = make_optimizer("adamw", model, head, lr, lr, 1e-4)
    steps = epochs * math.ceil(len(ready) / batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    images = ready.to(device, memory_format=torch.channels_last)
    targets = torch.as_tensor(labels, device=device)
    generator = torch.Generator().manual_seed(seed)
    seconds = []
    for _ in range(epochs):
        synchronize(device)
        start = time.perf_counter()
        for batch in torch.randperm(len(images), generator=generator).split(batch_size):
            batch = batch.to(device)
            with (
                float32_depthwise_convolutions(model, device, dtype),
                torch.autocast(device.type, dtype, enabled=dtype != torch.float32),
            ):
                inputs = images[batch].contiguous(memory_format=torch.channels_last)
                logits = model(inputs).float()
                loss = torch.nn.functional.cross_entropy(logits, targets[batch])
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def speed_table(report: Report, device, image_size: int, epochs: int, seeds: list[int]) -> None:
    """Seconds per epoch and accuracy of skdeep and skorch with the same settings."""
    try:
        import skorch  # noqa: F401
    except ImportError:
        report.note("(skorch is not installed: `pip install skorch` for the speed comparison)")
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
        # epoch s, fit s, accuracy
        results = {"skorch": ([], [], []), "skdeep": ([], [], []), "bare step": ([], [], [])}
        for seed in seeds:

            def run_skdeep(seed=seed, precision=precision, results=results):
                ours = FineTuneClassifier(
                    image_size=image_size,
                    max_epochs=epochs,
                    batch_size=batch_size,
                    lr=lr,
                    precision=precision,
                    device=str(device),
                    random_state=seed,
                )
                start = time.perf_counter()
                ours.fit(X_train, y_train)
                fit_seconds = time.perf_counter() - start
                epoch_seconds = [record["seconds"] for record in ours.history_]
                _append(results["skdeep"], epoch_seconds, fit_seconds, ours.score(X_test, y_test))

            def run_skorch(seed=seed, dtype=dtype, results=results):
                theirs = skorch_net(device, dtype, epochs, batch_size, lr, seed, len(X_train))
                start = time.perf_counter()
                theirs.fit(ready, torch.as_tensor(y_train))
                fit_seconds = time.perf_counter() - start
                accuracy = float((theirs.predict(ready_test) == y_test).mean())
                _append(results["skorch"], list(theirs.history[:, "dur"]), fit_seconds, accuracy)

            def run_bare(seed=seed, dtype=dtype, results=results):
                epoch_seconds = bare_step_epochs(
                    device, dtype, epochs, batch_size, lr, seed, ready, y_train
                )
                results["bare step"][0].extend(epoch_seconds)

            # Alternate which library runs first, so that neither always runs warmer.
            order = (run_skdeep, run_skorch) if seed % 2 == 0 else (run_skorch, run_skdeep)
            for run in (*order, run_bare):
                run()
        skorch_epoch = statistics.median(results["skorch"][0])
        bare_epoch = statistics.median(results["bare step"][0])
        for library, (epoch_seconds, fit_seconds, accuracies) in results.items():
            epoch = statistics.median(epoch_seconds)
            spread = np.std(accuracies, ddof=1) if len(accuracies) > 1 else float("nan")
            rows.append(
                [
                    library,
                    precision,
                    epoch,
                    statistics.mean(fit_seconds) if fit_seconds else "",
                    f"{100 * np.mean(accuracies):.1f} ± {100 * spread:.1f}" if accuracies else "",
                    f"{epoch / skorch_epoch:.2f}",
                    f"{bare_epoch / epoch:.2f}",
                ]
            )
    report.table(
        f"Fine-tuning speed against skorch: mobilenet_v2 (ImageNet) at {image_size} px, MNIST "
        f"4,000 images, batch {batch_size}, AdamW lr {lr} warm-up + cosine, {epochs} epochs, "
        f"seeds {seeds} ({machine()})",
        ["library", "precision", "s / epoch", "fit s", "test accuracy %", "epoch time vs skorch",
         "x bare step (speed)"],
        rows,
    )  # fmt: skip
    report.note(
        "Both libraries: skdeep's fused AdamW with no weight decay on biases and norms, "
        "warm-up + cosine per batch, channels_last batches, the same precision (in "
        "bfloat16 on a CPU, small and strided depthwise convolutions in float32, as skdeep "
        "trains), and a "
        "batch-norm recalibration pass after training (in both fit times). skorch's input "
        "was preprocessed beforehand; skdeep preprocesses every batch from uint8 inside "
        "its epoch time. Epoch times are medians over seeds and epochs; each precision "
        "row is divided by skorch at the same precision. 'x bare step' is the bare "
        "loop's epoch time over the row's (1.00: as fast as the training steps alone; the "
        "bare loop trains without a recalibration pass and is not scored)."
    )


TIE = 0.05  # step times this close are a tie between the precisions (a shared machine)


def precision_table(report: Report, quick: bool) -> None:
    """Where bfloat16 trains faster than float32 on this CPU, and what "auto" picks.

    One training step (forward, backward, fused AdamW) of a random-init network on a
    random batch of 32, channels_last: in float32, in bfloat16 autocast as plain
    PyTorch runs it, and in bfloat16 as skdeep trains (depthwise convolutions in
    float32, :func:`skdeep._device.float32_depthwise_convolutions`). The three
    alternate step by step, so that drifts of a shared machine hit all; the median of
    the repeats after one warm-up step each.
    """
    if not cpu_has_native_bfloat16():
        report.note("(no native bfloat16 on this CPU: the precision table is skipped)")
        return
    cpu = torch.device("cpu")
    sizes = (64, 224) if quick else (32, 64, 128, 224)
    networks = ("mobilenet_v2", "resnet18") if quick else (
        "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "resnet18")  # fmt: skip
    repeats = 2 if quick else 5

    def as_skdeep_trains(model):
        return float32_depthwise_convolutions(model, cpu, torch.bfloat16)

    def as_is(model):
        return contextlib.nullcontext()

    modes = {
        "float32": (torch.float32, as_is),
        "bfloat16, plain autocast": (torch.bfloat16, as_is),
        "bfloat16, skdeep": (torch.bfloat16, as_skdeep_trains),
    }
    rows = []
    for name in networks:
        model = load_backbone(name, None).module.to(memory_format=torch.channels_last).train()
        parameters = list(model.parameters())
        optimizer = optimizer_of_groups("adamw", parameter_groups(parameters, 1e-3, 1e-4))
        for size in sizes:
            images = torch.randn(32, 3, size, size).contiguous(memory_format=torch.channels_last)
            labels = torch.randint(0, 10, (32,))
            seconds = {mode: [] for mode in modes}
            for repeat in range(repeats + 1):
                for mode, (dtype, training_context) in modes.items():
                    start = time.perf_counter()
                    with (
                        training_context(model),
                        torch.autocast("cpu", dtype, enabled=dtype != torch.float32),
                    ):
                        loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                    optimizer.step()
                    if repeat:  # the first step of each mode builds its kernels
                        seconds[mode].append(time.perf_counter() - start)
            full, plain, ours = (statistics.median(seconds[mode]) for mode in modes)
            auto = resolve_precision("auto", cpu, training_size=size)
            faster = torch.bfloat16 if ours < full else torch.float32
            picks = "tie" if abs(ours / full - 1) <= TIE else "yes" if auto == faster else "no"
            rows.append([name, size, full, f"{plain / full:.2f}", f"{ours / full:.2f}",
                         str(auto).removeprefix("torch."), picks])  # fmt: skip
    report.table(
        f"Where bfloat16 trains faster: one training step, batch 32, median of {repeats} "
        f"({machine()})",
        ["network", "px", "float32 s / step", "bfloat16 / float32, plain autocast",
         "bfloat16 / float32, skdeep", "precision='auto' trains in",
         "auto picks the faster"],
        rows,
    )  # fmt: skip
    report.note(
        "Random-init networks (the speed of a step does not depend on the weights), "
        f"random batches, AdamW; the modes alternate step by step ('tie': within {TIE:.0%}"
        " of each other). 'skdeep' keeps "
        "trainable depthwise convolutions in float32 inside bfloat16 autocast, as fit "
        "does; precision='auto' trains in bfloat16 from the size that "
        "skdeep._device.BFLOAT16_TRAINING_FROM gives this CPU's bfloat16 instructions. "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}: on a machine "
        "whose cores other processes share, the bfloat16 backward kernels slow down far "
        "more than float32's, so run it on a quiet machine."
    )


def _append(result, epoch_seconds, fit_seconds, accuracy):
    result[0].extend(epoch_seconds)
    result[1].append(fit_seconds)
    result[2].append(accuracy)


SECTIONS = ("accuracy", "speed", "precision")


def main() -> None:
    """Run the tables and write results/fine_tune.md (or fine_tune_<sections>.md)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one epoch, for a smoke run")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the speed table")
    parser.add_argument(
        "--sections", nargs="+", choices=SECTIONS, default=SECTIONS, help="tables to run"
    )
    args = parser.parse_args()
    device = resolve_device(args.device)
    name = report_name("fine_tune", args.sections, SECTIONS, args.quick)
    report = Report(name, device, ("skorch",))
    if "accuracy" in args.sections:
        accuracy_table(report, device, args.image_size, 1 if args.quick else 3, args.quick)
    if "speed" in args.sections:
        if args.quick:
            speed_table(report, device, args.image_size, epochs=1, seeds=[0])
        else:
            speed_table(report, device, args.image_size, epochs=2, seeds=list(range(args.seeds)))
    if "precision" in args.sections:
        precision_table(report, args.quick)
    report.write()


if __name__ == "__main__":
    main()
