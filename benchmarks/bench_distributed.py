"""Data-parallel fine-tuning: one process against n, same global batch.

Run:  .venv/bin/python benchmarks/bench_distributed.py [--quick] [--device cuda --devices N]
(``make bench`` runs it; it writes results/distributed.md.)

FineTuneClassifier fine-tunes the offline ImageNet mobilenet_v2 on 4,000 MNIST digits at 32
px (1,000 others score it), once in one process and with ``devices=n``, batch norms
synchronized or not (the default), with the same global batch, seeds and settings. On the
CPU each process gets an equal share of the cores (one thread each on this 2-core machine,
the one process too), so two processes can at best halve the time: the cores bound the gain.
Reported: seconds per epoch (rank 0's, from ``history_``), the whole ``fit`` (start-up of
the processes included), the scaling efficiency ``t_1 / (n * t_n)`` of the epochs, and the
test accuracy of each, paired by seed. On a GPU machine, ``--device cuda --devices N``
compares one GPU with N.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from _common import Report, machine, paired_rows
from sklearn.model_selection import train_test_split

from skdeep import FineTuneClassifier
from skdeep._device import resolve_device
from skdeep.datasets import load_mnist_5k


def main() -> None:
    """Fit alone and with ``--devices`` processes over seeds; write results/distributed.md."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="800 images, one seed")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--devices", type=int, default=2, help="processes (or GPUs)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    device = resolve_device(args.device)
    if device.type == "cpu":  # the one process gets one rank's share of the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.devices))
    images, labels = load_mnist_5k()
    X_train, X_test, y_train, y_test = train_test_split(
        images, labels, test_size=1000, stratify=labels, random_state=0
    )
    if args.quick:
        X_train, y_train = X_train[:800], y_train[:800]
    seeds = [0] if args.quick else list(range(args.seeds))
    report = Report("distributed" + ("_quick" if args.quick else ""), device)
    settings = dict(image_size=32, max_epochs=args.epochs, batch_size=64, device=str(device))
    runs = {
        "1 process": {},
        f"{args.devices} processes": dict(devices=args.devices),
        f"{args.devices} processes, sync_batch_norm=True": dict(
            devices=args.devices, sync_batch_norm=True
        ),
    }
    accuracy, epoch_seconds, fit_seconds = {}, {}, {}
    for seed in seeds:
        for name, params in runs.items():
            start = time.perf_counter()
            clf = FineTuneClassifier(**settings, random_state=seed, **params)
            clf.fit(X_train, y_train)
            fit_seconds.setdefault(name, {})[seed] = time.perf_counter() - start
            epoch_seconds.setdefault(name, {})[seed] = np.mean(
                [record["seconds"] for record in clf.history_]
            )
            accuracy.setdefault(name, {})[seed] = 100 * clf.score(X_test, y_test)
            print(name, seed, accuracy[name][seed], epoch_seconds[name][seed], flush=True)
    one = next(iter(runs))
    rows = [
        [*row[:5], np.mean(list(epoch_seconds[row[0]].values())), row[5],
         np.mean([epoch_seconds[one][s] / (args.devices * epoch_seconds[row[0]][s])
                  for s in seeds]) if row[0] != one else ""]
        for row in paired_rows(accuracy, one, fit_seconds)
    ]  # fmt: skip
    report.table(
        f"MNIST {len(X_train)} at 32 px, mobilenet_v2 ImageNet, {args.epochs} epochs, global "
        f"batch 64 ({machine()}; each CPU process on {torch.get_num_threads()} thread(s))",
        ["training", "test accuracy %", "std", "seeds", "minus 1 process (95% interval)",
         "s/epoch", "s/fit", f"scaling efficiency t_1 / ({args.devices} t_n)"],
        rows,
    )  # fmt: skip
    report.note(
        "Scaling efficiency of the epochs: 1.00 is perfect. By default each process "
        "normalizes its part of a batch with the part's own statistics; "
        "sync_batch_norm=True uses the global batch's, as one process does, at the cost of "
        "two collectives per batch norm and step (104 for mobilenet_v2). "
        + (
            "On this machine the cores bound the gain: one process already uses one core, "
            f"so {args.devices} processes can at best divide the time by the number of "
            "cores they add; the fit time also holds each process's start (importing "
            "torch, building the network)."
            if device.type == "cpu"
            else ""
        )
    )
    report.write()


if __name__ == "__main__":
    main()
