"""Data-parallel fine-tuning: one process against n, same global batch.

Run:  .venv/bin/python benchmarks/bench_distributed.py [--quick] [--device cuda --devices N]
(``make bench`` runs it; it writes results/distributed.md.)

FineTuneClassifier fine-tunes the offline ImageNet mobilenet_v2 on 4,000 MNIST digits at 32
px (1,000 others score it), once in one process and with ``devices=n``, batch norms
synchronized or not (the default), with the same global batch, seeds and settings; and
once more under ``torchrun`` with ``random_state=None`` (its ranks agree on rank 0's seed:
the row shows what a user who sets no seed gets; its runs are not paired with the
seeds of the others). On the CPU each process gets an equal share of the cores (one
thread each on this 2-core machine, the one process too), so two processes can at best
halve the time: the cores bound the gain. Reported: seconds per epoch (rank 0's, from
``history_``), the whole ``fit`` (start-up of the spawned processes included; under
torchrun, from ``fit``'s call in rank 0, torchrun's own start-up not counted), the scaling
efficiency ``t_1 / (n * t_n)`` of the epochs, and the test accuracy of each. On a GPU
machine, ``--device cuda --devices N`` compares one GPU with N.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import Report, machine, paired_rows
from sklearn.model_selection import train_test_split

from skdeep import FineTuneClassifier
from skdeep._device import resolve_device
from skdeep.datasets import load_mnist_5k

TORCHRUN_ROW = "{n} processes under torchrun, random_state=None"


def training_data(quick: bool):
    """Split MNIST: 4,000 digits to train on (800 with quick), 1,000 to score."""
    images, labels = load_mnist_5k()
    X_train, X_test, y_train, y_test = train_test_split(
        images, labels, test_size=1000, stratify=labels, random_state=0
    )
    if quick:
        X_train, y_train = X_train[:800], y_train[:800]
    return X_train, X_test, y_train, y_test


def settings(epochs: int, device: str) -> dict:
    """Return the estimator's settings shared by every row."""
    return dict(image_size=32, max_epochs=epochs, batch_size=64, device=device)


def fit_under_torchrun(args, run: int) -> dict:
    """Run one fit in ``args.devices`` ranks started by torchrun; return rank 0's figures."""
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "result.json")
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(args.devices), str(Path(__file__).resolve()),
            "--torchrun-rank-fit", out, "--epochs", str(args.epochs), "--device", args.device,
        ] + (["--quick"] if args.quick else [])  # fmt: skip
        threads = max(1, (os.cpu_count() or 1) // args.devices)
        environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run(command, check=True, env=environment)
        return json.loads(Path(out).read_text())


def rank_fit(args) -> None:
    """Inside torchrun: fit with devices=WORLD_SIZE and no seed; rank 0 writes its figures."""
    X_train, X_test, y_train, y_test = training_data(args.quick)
    start = time.perf_counter()
    clf = FineTuneClassifier(
        **settings(args.epochs, args.device),
        devices=int(os.environ["WORLD_SIZE"]),
        random_state=None,
    ).fit(X_train, y_train)
    seconds = time.perf_counter() - start
    if int(os.environ["RANK"]) == 0:
        figures = {
            "accuracy": 100 * clf.score(X_test, y_test),
            "epoch_seconds": float(np.mean([record["seconds"] for record in clf.history_])),
            "fit_seconds": seconds,
        }
        Path(args.torchrun_rank_fit).write_text(json.dumps(figures))


def main() -> None:
    """Fit alone and with ``--devices`` processes over seeds; write results/distributed.md."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="800 images, one seed")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--devices", type=int, default=2, help="processes (or GPUs)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--torchrun-rank-fit", help=argparse.SUPPRESS)  # inside torchrun
    args = parser.parse_args()
    if args.torchrun_rank_fit:
        rank_fit(args)
        return
    device = resolve_device(args.device)
    if device.type == "cpu":  # the one process gets one rank's share of the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.devices))
    X_train, X_test, y_train, y_test = training_data(args.quick)
    seeds = [0] if args.quick else list(range(args.seeds))
    report = Report("distributed" + ("_quick" if args.quick else ""), device)
    runs = {
        "1 process": {},
        f"{args.devices} processes": dict(devices=args.devices),
        f"{args.devices} processes, sync_batch_norm=True": dict(
            devices=args.devices, sync_batch_norm=True
        ),
    }
    # A machine with fewer GPUs than --devices: the one-process row alone, and a note.
    too_few_gpus = device.type == "cuda" and torch.cuda.device_count() < args.devices
    if too_few_gpus:
        runs = {"1 process": {}}
    accuracy, epoch_seconds, fit_seconds = {}, {}, {}
    for seed in seeds:
        for name, params in runs.items():
            start = time.perf_counter()
            clf = FineTuneClassifier(
                **settings(args.epochs, str(device)), random_state=seed, **params
            )
            clf.fit(X_train, y_train)
            fit_seconds.setdefault(name, {})[seed] = time.perf_counter() - start
            epoch_seconds.setdefault(name, {})[seed] = np.mean(
                [record["seconds"] for record in clf.history_]
            )
            accuracy.setdefault(name, {})[seed] = 100 * clf.score(X_test, y_test)
            print(name, seed, accuracy[name][seed], epoch_seconds[name][seed], flush=True)
    torchrun = TORCHRUN_ROW.format(n=args.devices)
    for run in range(0 if too_few_gpus else len(seeds)):  # unpaired keys: no difference
        figures = fit_under_torchrun(args, run)
        key = f"run {run}"
        accuracy.setdefault(torchrun, {})[key] = figures["accuracy"]
        epoch_seconds.setdefault(torchrun, {})[key] = figures["epoch_seconds"]
        fit_seconds.setdefault(torchrun, {})[key] = figures["fit_seconds"]
        print(torchrun, run, figures, flush=True)
    one = next(iter(runs))
    alone = np.mean(list(epoch_seconds[one].values()))

    def efficiency(name: str):
        if name == one:
            return ""
        if name == torchrun:  # unpaired: the means' ratio
            return alone / (args.devices * np.mean(list(epoch_seconds[name].values())))
        return np.mean(
            [epoch_seconds[one][s] / (args.devices * epoch_seconds[name][s]) for s in seeds]
        )

    rows = [
        [*row[:5], np.mean(list(epoch_seconds[row[0]].values())), row[5], efficiency(row[0])]
        for row in paired_rows(accuracy, one, fit_seconds)
    ]
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
        "two collectives per batch norm and step (104 for mobilenet_v2). The torchrun row "
        "sets no seed (its ranks agree on rank 0's): its runs are not paired with the "
        "seeds of the other rows, so it has no paired difference, its efficiency is the "
        "ratio of mean epoch times, and its s/fit starts at fit's call in rank 0 "
        "(torchrun's own start-up not counted). "
        + (
            "On this machine the cores bound the gain: one process already uses one core, "
            f"so {args.devices} processes can at best divide the time by the number of "
            "cores they add; the fit time also holds each process's start (importing "
            "torch, building the network)."
            if device.type == "cpu"
            else ""
        )
    )
    if too_few_gpus:
        report.note(
            f"This machine has {torch.cuda.device_count()} GPU(s), fewer than --devices "
            f"{args.devices}: no data-parallel row, only one process on one GPU."
        )
    report.write()


if __name__ == "__main__":
    main()
