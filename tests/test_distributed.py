"""Tests of data-parallel training (``devices``): gloo on the CPU, two processes.

Every fit here asks for device="cpu", so that a machine with one GPU runs them too.

Every spawned process listens on 127.0.0.1 only and is stopped by ``fit`` itself, even
when a rank fails; the tests check that none is left behind.
"""

from __future__ import annotations

import contextlib
import glob
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from unittest.mock import patch

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, PredefinedSplit
from torch import nn

from skdeep import DomainAdaptedClassifier, FineTuneClassifier
from skdeep._preprocess import IMAGENET_MEAN, IMAGENET_STD

from .conftest import SlowNet, TinyNet, separable_images, tiny_training


@pytest.fixture(autouse=True)
def no_process_left_behind():
    """After each test, no child process of this one is alive."""
    yield
    deadline = time.monotonic() + 20
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not multiprocessing.active_children()


class UnbiasedNet(TinyNet):
    """TinyNet without biases in the convolutions before its batch norms (as torchvision's).

    Such a bias has a zero gradient in exact arithmetic (the batch norm removes it), so
    Adam, which rescales gradients, moves it by float noise that differs between one
    process and two: it would make equal fits look different.
    """

    def __init__(self):
        super().__init__()
        for index in (0, 3):
            conv = self.features[index]
            self.features[index] = nn.Conv2d(
                conv.in_channels, conv.out_channels, 3, conv.stride, 1, bias=False
            )


def training(**params) -> dict:
    """Fast settings: UnbiasedNet, 24 px, float32, crops drawn per global batch, validation.

    Batch norms are synchronized, so that two processes take the steps of one.
    """
    torch.manual_seed(0)
    defaults = dict(
        device="cpu",
        backbone=UnbiasedNet(),
        sync_batch_norm=True,
        augment="crop",
        early_stopping=True,
        validation_fraction=0.25,
        n_iter_no_change=5,
    )
    return tiny_training(**{**defaults, **params})


def assert_same_fit(one, two, tolerance=1e-4):
    """Two fits took the same steps: equal weights, statistics and history.

    Equal to float32 rounding: the ranks add up their sums in another order than one
    process, and a few steps carry the difference along.
    """
    first, second = one.model_.state_dict(), two.model_.state_dict()
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(
            first[key], second[key], rtol=tolerance, atol=tolerance / 10, msg=key
        )
    for a, b in zip(one.history_, two.history_, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if key != "seconds":
                assert a[key] == pytest.approx(b[key], rel=tolerance, abs=tolerance / 100), key


def test_two_processes_take_the_steps_of_one_with_the_same_global_batch():
    """Global batch 8: two processes of 4 images each equal one process of 8."""
    X, y = separable_images(n_per_class=20, size=24)  # 30 training rows, 10 validation
    alone = FineTuneClassifier(**training(batch_size=10)).fit(X, y)
    together = FineTuneClassifier(**training(batch_size=10, devices=2)).fit(X, y)
    assert_same_fit(alone, together)
    assert together.n_epochs_ == alone.n_epochs_ and together.best_epoch_ == alone.best_epoch_
    # An ordinary fitted estimator: no wrapper, plain batch norms, no process group.
    assert type(together.model_) is UnbiasedNet
    assert type(together.model_.features[1]) is nn.BatchNorm2d
    assert not torch.distributed.is_initialized()
    np.testing.assert_allclose(together.predict_proba(X), alone.predict_proba(X), atol=1e-5)


class UntrackedNet(UnbiasedNet):
    """UnbiasedNet whose first batch norm keeps no running statistics."""

    def __init__(self):
        super().__init__()
        self.features[1] = nn.BatchNorm2d(8, track_running_stats=False)


def test_class_weights_untracked_norms_and_a_random_state_instance_stay_one_process_exact():
    """Class weights, an untracked batch norm, a RandomState: still the steps of one.

    Imbalanced classes with class_weight="balanced", a batch norm without running
    statistics, random_state=RandomState(0): two processes take the steps of one, and
    the caller's generator moves on as one process's fit moves it.
    """
    X, y = separable_images(n_per_class=20, size=24)
    keep = [*np.flatnonzero(y == "horizontal")[:8], *np.flatnonzero(y == "vertical")]
    X, y = X[sorted(keep)], y[sorted(keep)]  # 28 rows, 8 and 20; 28 % 8 = 4, split evenly
    generators = [np.random.RandomState(0), np.random.RandomState(0)]
    fits = []
    for devices, generator in zip([None, 2], generators, strict=True):
        torch.manual_seed(0)
        params = training(
            backbone=UntrackedNet(), class_weight="balanced", early_stopping=False,
            max_epochs=2, random_state=generator, devices=devices,
        )  # fmt: skip
        fits.append(FineTuneClassifier(**params).fit(X, y))
    assert_same_fit(*fits)
    assert generators[0].randint(1000) == generators[1].randint(1000)


def test_unsynchronized_batch_norms_normalize_each_part_alone():
    """sync_batch_norm=False: each rank's batch statistics, so other steps than one process.

    The gradients are still averaged: both ranks end with one model, which predicts alone.
    """
    X, y = separable_images(n_per_class=20, size=24)
    params = training(batch_size=10, early_stopping=False, max_epochs=2)
    synchronized = FineTuneClassifier(**params, devices=2).fit(X, y)
    local = FineTuneClassifier(**{**params, "sync_batch_norm": False}, devices=2).fit(X, y)
    weights = synchronized.model_.state_dict()["features.0.weight"]
    assert not torch.allclose(local.model_.state_dict()["features.0.weight"], weights, atol=1e-5)
    assert type(local.model_.features[1]) is nn.BatchNorm2d
    assert local.predict_proba(X).shape == (len(X), 2)


@pytest.mark.parametrize("divergence", ["mmd", "joint_mmd"])
def test_domain_penalty_of_two_processes_is_that_of_the_global_batch(divergence):
    """Features (and labels) are gathered across ranks: the one-process MMD, step by step."""
    X_source, y_source = separable_images(n_per_class=16, size=24)
    X_target, _ = separable_images(n_per_class=16, size=24, seed=3)
    # Gaussian kernels with detached bandwidths: the default Laplacian ones take gradients
    # through a median, whose chosen element float rounding can flip from one run to the
    # next, so that equal penalties would not give equal steps to this tolerance.
    params = training(
        divergence_schedule="constant", divergence_weight=3.0, max_epochs=2, early_stopping=False,
        mmd_kernel="gaussian", mmd_estimator="unbiased", divergence=divergence,
    )  # fmt: skip
    alone = DomainAdaptedClassifier(**params).fit(X_source, y_source, X_target=255 - X_target)
    together = DomainAdaptedClassifier(**params, devices=2)
    together.fit(X_source, y_source, X_target=255 - X_target)
    assert together.history_[0][divergence] > 0
    # A penalty of weight 3 amplifies float32 rounding over the steps (up to 2e-4 here).
    assert_same_fit(alone, together, tolerance=2e-3)


class RaisingNet(TinyNet):
    """TinyNet whose rank 1 raises a ValueError on its second training batch."""

    batches = 0

    def forward(self, x):
        """Raise on rank 1's second batch."""
        if self.training and torch.is_grad_enabled() and torch.distributed.is_initialized():
            RaisingNet.batches += 1
            if torch.distributed.get_rank() == 1 and RaisingNet.batches == 2:
                raise ValueError("rank 1 could not go on")
        return super().forward(x)


class KilledNet(TinyNet):
    """TinyNet whose rank 1 is killed by SIGKILL on its second training batch."""

    batches = 0

    def forward(self, x):
        """Kill rank 1's process on its second batch."""
        if self.training and torch.is_grad_enabled() and torch.distributed.is_initialized():
            KilledNet.batches += 1
            if torch.distributed.get_rank() == 1 and KilledNet.batches == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(x)


def test_a_rank_that_raises_fails_fit_with_its_error_and_traceback():
    """The parent raises the rank's own ValueError, with where it came from."""
    X, y = separable_images(n_per_class=8, size=24)
    clf = FineTuneClassifier(**tiny_training(device="cpu", backbone=RaisingNet(), devices=2))
    start = time.monotonic()
    with pytest.raises(ValueError, match="rank 1 could not go on") as caught:
        clf.fit(X, y)
    assert time.monotonic() - start < 120
    notes = "\n".join(getattr(caught.value, "__notes__", []))
    assert "raised in rank 1 of the data-parallel fit" in notes and "forward" in notes
    assert not hasattr(clf, "history_")


def test_a_killed_rank_fails_fit_clearly_instead_of_hanging():
    """A rank killed by a signal: fit stops every rank and says which died, and how."""
    X, y = separable_images(n_per_class=8, size=24)
    clf = FineTuneClassifier(**tiny_training(device="cpu", backbone=KilledNet(), devices=2))
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 1 of 2 died .*SIGKILL"):
        clf.fit(X, y)
    assert time.monotonic() - start < 120


def test_the_fitted_estimator_pickles_clones_and_grid_searches():
    """GridSearchCV works; its refit pickles and predicts in one process; clone keeps devices."""
    X, y = separable_images(n_per_class=12, size=24)
    one_split = PredefinedSplit(np.where(np.arange(len(y)) % 3 == 0, 0, -1))  # one fit
    search = GridSearchCV(
        FineTuneClassifier(**tiny_training(device="cpu", devices=2, max_epochs=1)),
        {"lr": [0.01]},
        cv=one_split,
    ).fit(X, y)
    clf = search.best_estimator_
    assert clf.devices == 2 and 0 <= search.best_score_ <= 1
    restored = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(restored.predict(X), clf.predict(X))
    assert clone(clf).get_params()["devices"] == 2 and not hasattr(clone(clf), "model_")
    # A refit that fails leaves the estimator unfitted, not fitted with the old network.
    clf.set_params(early_stopping=True, validation_fraction=0.95)
    with pytest.raises(ValueError, match=r"validation_fraction=0.95 leaves"):
        clf.fit(X, np.where(y == "horizontal", "cat", "dog"))
    with pytest.raises(NotFittedError):
        clf.predict(X)


@pytest.mark.parametrize(
    "devices, message",
    [
        (0, r"'devices' parameter"),
        ([0, 1], "lists GPUs, but the device is cpu"),
        ([1, 1], "'devices' parameter|repeats an index"),
    ],
)
def test_bad_devices_are_named(devices, message):
    """Bad devices values get errors that name the parameter."""
    X, y = separable_images(n_per_class=4, size=24)
    with pytest.raises(ValueError, match=message):
        FineTuneClassifier(**tiny_training(devices=devices, device="cpu")).fit(X, y)


def test_under_torchrun_devices_counts_the_processes_of_every_machine(monkeypatch):
    """Two machines of 4 GPUs: devices=8 is valid on each, though each has 4 GPUs."""
    from skdeep._distributed import check_devices

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(ValueError, match="asks for 8 GPUs, but this machine has 4"):
        check_devices(8, torch.device("cuda"))
    for name, value in {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    assert check_devices(8, torch.device("cuda")) == list(range(8))


def test_torchrun_with_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    """A local rank without a GPU of its own is named, not a CUDA 'invalid device ordinal'."""
    from skdeep._distributed import active_context

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="local rank 1, but this machine has 1 GPU"):
        active_context(2, torch.device("cuda"))


def test_the_global_batch_must_split_evenly():
    """batch_size is the global batch: it must split into equal parts."""
    X, y = separable_images(n_per_class=8, size=24)
    with pytest.raises(ValueError, match=r"batch_size=7 must be a multiple of the 2 processes"):
        FineTuneClassifier(**tiny_training(device="cpu", devices=2, batch_size=7)).fit(X, y)


TORCHRUN_SCRIPT = """
import sys
import numpy as np
import torch
from skdeep import FineTuneClassifier
from tests.conftest import tiny_training
from tests.test_distributed import RecordingNet, numbered_images

if __name__ == "__main__":
    X, y = numbered_images(24)
    mode = sys.argv[2]
    rank = int(__import__("os").environ["RANK"])
    if mode == "shards":  # the habit of other data-parallel code: each rank its own rows
        X, y = X[12 * rank : 12 * (rank + 1)], y[12 * rank : 12 * (rank + 1)]
    params = tiny_training(
        device="cpu", devices=2, max_epochs=2, recalibrate_bn=mode == "recalibrate",
        random_state=None, backbone=RecordingNet(sys.argv[1]),
    )
    clf = FineTuneClassifier(**params).fit(X, y)
    np.save(sys.argv[1] + f"/rank{rank}.npy", clf.predict_proba(X))
"""


def run_torchrun(tmp_path, mode: str) -> subprocess.CompletedProcess:
    """Run TORCHRUN_SCRIPT under torchrun with two CPU processes."""
    script = tmp_path / "train.py"
    script.write_text(TORCHRUN_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    environment = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(script), str(tmp_path), mode,
    ]  # fmt: skip
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("recalibration", ["recalibrate", "none"])
def test_torchrun_ranks_join_its_group_agree_on_a_seed_and_end_alike(tmp_path, recalibration):
    """Under torchrun --nproc-per-node 2, with random_state=None: one shuffle, one model.

    The ranks agree on rank 0's seed, so the rows of each epoch are split between them,
    not drawn twice. Batch norms are not synchronized (the default): the ranks' running
    statistics come from a recalibration over the global batches, or are rank 0's.
    """
    result = run_torchrun(tmp_path, recalibration)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy")
    np.testing.assert_array_equal(first, second)
    assert first.shape == (24, 2)
    trained = read_trained_rows(tmp_path, world_size=2, steps_per_epoch=3)
    for epoch in trained:  # 24 rows, batch 8: three steps of 4 images on each rank
        assert not set(epoch[0]) & set(epoch[1])
        assert sorted(epoch[0] + epoch[1]) == list(range(24))


def test_torchrun_ranks_given_their_own_shards_are_refused(tmp_path):
    """Each rank passing its own half of the data would train half of it: refused, named."""
    result = run_torchrun(tmp_path, "shards")
    assert result.returncode != 0
    assert "every process must pass fit the same X and y" in result.stderr
    assert not (tmp_path / "rank0.txt").exists()  # refused before any training step


# ----------------------------------------------------------------------------------------
# The data plan end to end: which images each rank trains on
# ----------------------------------------------------------------------------------------


def numbered_images(n: int, size: int = 24):
    """Image ``i`` is filled with the value ``i``; two classes, alternating."""
    X = np.repeat(np.arange(n, dtype=np.uint8), size * size * 3).reshape(n, size, size, 3)
    return X, np.array(["even", "odd"] * (n // 2) + ["even"] * (n % 2))


class RecordingNet(TinyNet):
    """TinyNet that records the images each process trains on, and a dropout-like draw.

    It reads the number of each image of :func:`numbered_images` back from its input,
    normalized with ImageNet's mean and standard deviation, and appends one line per
    training batch to ``<folder>/rank<r>.txt``: the numbers, then a draw of torch's
    global generator (the stream dropout draws from).
    """

    def __init__(self, folder):
        super().__init__()
        self.folder = str(folder)

    def forward(self, x):
        """Record the batch's image numbers and a random draw, then classify."""
        if self.training and torch.is_grad_enabled():  # not skdeep's no-grad probe
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            pixels = x[:, 0, 0, 0].float() * IMAGENET_STD[0] + IMAGENET_MEAN[0]
            numbers = torch.round(pixels * 255).int().tolist()
            draw = torch.rand(()).item()
            with open(os.path.join(self.folder, f"rank{rank}.txt"), "a") as file:
                file.write(" ".join(map(str, numbers)) + f" | {draw!r}\n")
        return super().forward(x)


def read_records(folder, rank: int) -> list[tuple[list[int], float]]:
    """One (image numbers, draw) per training batch of ``rank``, in order."""
    records = []
    for line in (folder / f"rank{rank}.txt").read_text().splitlines():
        numbers, draw = line.split(" | ")
        records.append(([int(n) for n in numbers.split()], float(draw)))
    return records


def read_trained_rows(folder, world_size: int, steps_per_epoch: int) -> list[list[list[int]]]:
    """For each epoch, each rank's trained image numbers."""
    per_rank = [read_records(folder, rank) for rank in range(world_size)]
    assert len({len(records) for records in per_rank}) == 1  # equal steps on every rank
    epochs = len(per_rank[0]) // steps_per_epoch
    assert epochs * steps_per_epoch == len(per_rank[0])
    return [
        [
            [
                row
                for rows, _ in records[e * steps_per_epoch : (e + 1) * steps_per_epoch]
                for row in rows
            ]
            for records in per_rank
        ]
        for e in range(epochs)
    ]


def test_two_ranks_train_every_row_once_per_epoch_when_rows_are_fewer_than_a_batch(
    tmp_path, monkeypatch
):
    """15 images, batch 32, random_state=None: each epoch trains all 15 on two ranks.

    One global batch of 16 (one image repeated as padding), parts of 8; the numbers of
    history_ come from those steps. The ranks draw their own dropout streams, and the
    rendezvous store is bound by the parent on a port the system chose.
    """
    from torch import distributed

    ports = []
    real_store = distributed.TCPStore

    def recording_store(host, port, *args, **kwargs):
        ports.append((host, port, kwargs.get("is_master")))
        return real_store(host, port, *args, **kwargs)

    monkeypatch.setattr(distributed, "TCPStore", recording_store)
    X, y = numbered_images(15)
    params = tiny_training(
        device="cpu", devices=2, batch_size=32, max_epochs=2, random_state=None,
        backbone=RecordingNet(tmp_path),
    )  # fmt: skip
    clf = FineTuneClassifier(**params).fit(X, y)
    assert ports == [("127.0.0.1", 0, True)]
    for epoch in read_trained_rows(tmp_path, world_size=2, steps_per_epoch=1):
        assert len(epoch[0]) == len(epoch[1]) == 8
        assert sorted(set(epoch[0] + epoch[1])) == list(range(15))
    assert [record["epoch"] for record in clf.history_] == [1, 2]
    assert all(record["train_loss"] > 0.1 for record in clf.history_)
    draws = [[draw for _, draw in read_records(tmp_path, rank)] for rank in range(2)]
    assert draws[0] != draws[1]  # each rank its own dropout


class RecordingPooledNet(RecordingNet):
    """RecordingNet with a batch norm after global pooling, as PooledNormNet."""

    def __init__(self, folder):
        super().__init__(folder)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(16))


@pytest.mark.parametrize("pooled_norm", [True, False])
def test_one_process_trains_a_last_image_too(tmp_path, pooled_norm):
    """9 images, batch 8: a batch norm that cannot train on one image gets one step of 9.

    Batch norms over maps train on one image: then 8 and 1. No image is dropped.
    """
    X, y = numbered_images(9)
    net = RecordingPooledNet(tmp_path) if pooled_norm else RecordingNet(tmp_path)
    FineTuneClassifier(**tiny_training(device="cpu", max_epochs=2, backbone=net)).fit(X, y)
    batches = [rows for rows, _ in read_records(tmp_path, 0)]
    sizes = [9] if pooled_norm else [8, 1]
    assert [len(rows) for rows in batches] == sizes * 2
    n = len(sizes)
    epochs = [[row for rows in batches[e * n : (e + 1) * n] for row in rows] for e in range(2)]
    assert [sorted(rows) for rows in epochs] == [list(range(9))] * 2


class PooledNormNet(TinyNet):
    """TinyNet with a batch norm after the global pooling: it cannot train on one image."""

    def __init__(self):
        super().__init__()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(16))

    def forward(self, x):
        """Pool, normalize over the batch, classify."""
        return self.fc(self.pool(self.features(x)))


def test_a_last_global_batch_of_two_images_does_not_leave_a_rank_one_image():
    """10 images, batch 8, two ranks: 8 + 2 would give each rank one image; 10 train at once."""
    X, y = separable_images(n_per_class=5, size=24)
    params = tiny_training(device="cpu", devices=2, backbone=PooledNormNet(), max_epochs=2)
    clf = FineTuneClassifier(**params).fit(X, y)
    assert [record["epoch"] for record in clf.history_] == [1, 2]


def test_too_few_rows_for_the_processes_are_refused_before_any_process_starts(monkeypatch):
    """Two images on two ranks with batch norms: refused in the caller, with what to change."""
    from skdeep import _distributed

    def no_spawn(*args, **kwargs):
        raise AssertionError("a process was started")

    monkeypatch.setattr(_distributed, "spawn_fit", no_spawn)
    X, y = separable_images(n_per_class=1, size=24)
    clf = FineTuneClassifier(**tiny_training(device="cpu", devices=2, backbone=PooledNormNet()))
    with pytest.raises(
        ValueError,
        match=r"2 training image\(s\) with batch_size=8 and devices=2 give each process 1 "
        r"image\(s\) at a step, but it needs at least 2 \(the batch norm 'pool.2' sees one "
        r"value per channel per image\)",
    ):
        clf.fit(X, y)
    for fine in (
        dict(backbone=PooledNormNet(), freeze="backbone"),  # no batch norm trains
        dict(backbone=TinyNet()),  # batch norms over maps train on one image
    ):
        with pytest.raises(AssertionError, match="a process was started"):
            FineTuneClassifier(**tiny_training(device="cpu", devices=2, **fine)).fit(X, y)


@contextlib.contextmanager
def deadline(seconds: int):
    """Raise TimeoutError in the main thread if the block runs longer than ``seconds``."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_three_target_images_cycle_on_two_ranks():
    """A target set smaller than a batch: its images repeat in every target batch, no hang."""
    X_source, y_source = separable_images(n_per_class=8, size=24)
    X_target, _ = separable_images(n_per_class=2, size=24, seed=3)
    clf = DomainAdaptedClassifier(**tiny_training(device="cpu", devices=2, max_epochs=2))
    with deadline(120):
        clf.fit(X_source, y_source, X_target=255 - X_target[:3])
    assert [record["epoch"] for record in clf.history_] == [1, 2]
    assert all(record["mmd"] > 0 for record in clf.history_)


class RecordingAdapter(DomainAdaptedClassifier):
    """Writes each rank's domain classifier, as it ends training, to ``<folder>/rank<r>.pt``."""

    def _objective(self, *args, **kwargs):
        self._objective_made = super()._objective(*args, **kwargs)
        return self._objective_made

    def _record_training(self, frozen, result):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        state = self._objective_made.classifier.state_dict()
        torch.save(state, os.path.join(self.record_folder, f"rank{rank}.pt"))
        del self._objective_made  # the fitted estimator pickles back to the caller
        super()._record_training(frozen, result)


def test_the_domain_classifier_is_one_on_every_rank(tmp_path):
    """DANN on two ranks: each draws its own dropout, the classifiers stay equal."""
    X_source, y_source = separable_images(n_per_class=8, size=24)
    X_target, _ = separable_images(n_per_class=8, size=24, seed=3)
    clf = RecordingAdapter(
        **tiny_training(device="cpu", devices=2, max_epochs=2, divergence="adversarial")
    )
    clf.record_folder = str(tmp_path)
    clf.fit(X_source, y_source, X_target=255 - X_target)
    first, second = (torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2))
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-6, atol=1e-7, msg=key)
    alone = RecordingAdapter(**tiny_training(device="cpu", max_epochs=2, divergence="adversarial"))
    alone.record_folder = str(tmp_path)
    alone.fit(X_source, y_source, X_target=255 - X_target)  # the classifier did train
    assert not torch.equal(torch.load(tmp_path / "rank0.pt")["0.weight"], first["0.weight"])


class HangingNet(TinyNet):
    """TinyNet whose rank 1 stops for a minute, at a training step or in recalibration.

    On its second training batch, or in the batch-norm recalibration pass
    (``when="recalibration"``).
    """

    batches = 0

    def __init__(self, when: str = "step"):
        super().__init__()
        self.when = when

    def forward(self, x):
        """Sleep on rank 1's second batch, or in its recalibration pass."""
        if torch.distributed.is_initialized() and torch.distributed.get_rank() == 1:
            if self.when == "step" and self.training and torch.is_grad_enabled():
                HangingNet.batches += 1
                if HangingNet.batches == 2:
                    time.sleep(60)
            recalibrating = not self.training and not torch.is_inference_mode_enabled()
            if self.when == "recalibration" and recalibrating:
                time.sleep(60)
        return super().forward(x)


@pytest.mark.parametrize(
    "when, where",
    [("step", "epoch 1, step 2"), ("recalibration", "the batch-norm recalibration")],
)
def test_a_collective_that_does_not_arrive_fails_with_the_rank_and_the_step(when, where):
    """collective_timeout=3: rank 0 waits 3 s for rank 1, then fit fails, naming both."""
    X, y = separable_images(n_per_class=8, size=24)
    params = tiny_training(
        device="cpu", devices=2, backbone=HangingNet(when), collective_timeout=3, max_epochs=1
    )
    start = time.monotonic()
    with pytest.raises(
        RuntimeError,
        match=rf"rank 0 of 2: a collective at {where} did not complete within "
        r"collective_timeout=3 s",
    ):
        FineTuneClassifier(**params).fit(X, y)
    assert time.monotonic() - start < 40


class PidNet(SlowNet):
    """SlowNet that writes its process id to ``<folder>/<pid>`` as it starts training."""

    def __init__(self, folder):
        super().__init__()
        self.folder = str(folder)

    def forward(self, x):
        """Say who trains, then train slowly."""
        if self.training and torch.is_grad_enabled():
            open(os.path.join(self.folder, str(os.getpid())), "w").close()
        return super().forward(x)


KILLED_PARENT_SCRIPT = """
import signal
import sys
from skdeep import FineTuneClassifier
from tests.conftest import separable_images, tiny_training
from tests.test_distributed import PidNet

if __name__ == "__main__":
    ignore = len(sys.argv) > 3 and sys.argv[3] == "ignore"
    signal.signal(signal.SIGINT, signal.SIG_IGN if ignore else signal.default_int_handler)
    X, y = separable_images(n_per_class=8, size=24)
    epochs = int(sys.argv[2])
    params = tiny_training(device="cpu", devices=2, max_epochs=epochs, backbone=PidNet(sys.argv[1]))
    clf = FineTuneClassifier(**params).fit(X, y)
    print("fitted after", len(clf.history_), "epochs of", epochs, flush=True)
"""


def is_running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def fit_in_a_process_group(tmp_path, max_epochs=1000, sigint="default"):
    """Run KILLED_PARENT_SCRIPT in a session of its own; yield it once both ranks train.

    Yields the caller's Popen, the ranks' process ids and the temporary folder.
    """
    script, pids, temporary = tmp_path / "fit.py", tmp_path / "pids", tmp_path / "tmp"
    script.write_text(KILLED_PARENT_SCRIPT)
    pids.mkdir()
    temporary.mkdir()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    environment = {**os.environ, "PYTHONPATH": root, "TMPDIR": str(temporary)}
    command = [sys.executable, str(script), str(pids), str(max_epochs), sigint]
    parent = subprocess.Popen(
        command, env=environment, start_new_session=True, stdout=subprocess.PIPE, text=True
    )
    try:
        deadline_at = time.monotonic() + 120
        while len(os.listdir(pids)) < 2 and time.monotonic() < deadline_at:
            time.sleep(0.2)
        ranks = [int(name) for name in os.listdir(pids)]
        assert len(ranks) == 2, "the ranks did not start training"
        assert glob.glob(str(temporary / "skdeep-ranks-*"))
        yield parent, ranks, temporary
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize(
    "signal_number, whole_group",
    [(signal.SIGKILL, False), (signal.SIGTERM, False), (signal.SIGTERM, True)],
)
def test_ranks_end_and_remove_the_shared_data_when_the_caller_is_killed(
    tmp_path, signal_number, whole_group
):
    """The caller killed mid-fit (alone, or with its ranks): no rank, no data copy left."""
    with fit_in_a_process_group(tmp_path) as (parent, ranks, temporary):
        if whole_group:
            os.killpg(parent.pid, signal_number)
        else:
            parent.send_signal(signal_number)
        parent.wait(timeout=30)
        deadline_at = time.monotonic() + 30
        while any(map(is_running, ranks)) and time.monotonic() < deadline_at:
            time.sleep(0.2)
        assert not any(map(is_running, ranks))
        assert not glob.glob(str(temporary / "skdeep-ranks-*" / "*.npy"))  # no copy of X
        if whole_group:  # the rest of the folder goes at the next data-parallel fit
            from skdeep import _distributed

            with patch.object(tempfile, "tempdir", str(temporary)):
                _distributed._remove_abandoned_folders()
        assert not glob.glob(str(temporary / "skdeep-ranks-*"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_ends_training_at_one_step_and_fit_returns_as_in_one_process(tmp_path):
    """SIGINT to the whole process group (a terminal's Ctrl-C): fit returns, with a warning."""
    with fit_in_a_process_group(tmp_path) as (parent, ranks, temporary):
        time.sleep(1)
        os.killpg(parent.pid, signal.SIGINT)
        out, _ = parent.communicate(timeout=60)
        assert parent.returncode == 0
        assert "fitted after" in out and "epochs of 1000" in out
        assert not any(map(is_running, ranks))
        assert not glob.glob(str(temporary / "skdeep-ranks-*"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_caller_that_ignores_ctrl_c_trains_to_the_end(tmp_path):
    """SIGINT ignored by the caller: its ranks ignore it too, and every epoch runs."""
    with fit_in_a_process_group(tmp_path, max_epochs=12, sigint="ignore") as (parent, _, _):
        time.sleep(1)
        os.killpg(parent.pid, signal.SIGINT)
        out, _ = parent.communicate(timeout=120)
    assert parent.returncode == 0 and "fitted after 12 epochs of 12" in out


def test_a_later_fit_removes_only_folders_whose_owner_is_gone(tmp_path, monkeypatch):
    """Owned folders (their lock held) stay; abandoned ones go; lock-less ones are left."""
    from skdeep import _distributed

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    owned, abandoned, unlocked = (
        tmp_path / f"skdeep-ranks-{name}" for name in ("1-owned", "2-abandoned", "3-new")
    )
    for folder in (owned, abandoned, unlocked):
        folder.mkdir()
    (abandoned / "owner.lock").touch()
    with _distributed._ownership(str(owned)):
        _distributed._remove_abandoned_folders()
        assert owned.exists() and unlocked.exists() and not abandoned.exists()
    _distributed._remove_abandoned_folders()  # its owner is gone now
    assert not owned.exists()


class AuxiliaryNet(TinyNet):
    """TinyNet with an auxiliary head that runs only while training, as Inception's.

    The head ends in a batch norm over 1x1 maps.
    """

    def __init__(self):
        super().__init__()
        self.auxiliary = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(16))

    def forward(self, x):
        """Classify; while training, run the auxiliary head too (its output unused)."""
        maps = self.features(x)
        if self.training:
            self.auxiliary(maps)
        return self.fc(self.pool(maps).flatten(1))


class UntrackedPooledNet(TinyNet):
    """TinyNet with a batch norm after global pooling that keeps no running statistics."""

    def __init__(self):
        super().__init__()
        self.pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(16, track_running_stats=False)
        )


def test_the_batch_norm_probe_sees_training_only_layers_and_untracked_norms():
    """An auxiliary head's batch norm counts; an untracked one after pooling fits."""
    X, y = separable_images(n_per_class=5, size=24)
    with pytest.raises(ValueError, match=r"the batch norm 'auxiliary.1' sees one value"):
        FineTuneClassifier(**tiny_training(batch_size=1, backbone=AuxiliaryNet())).fit(X, y)
    clf = FineTuneClassifier(**tiny_training(batch_size=3, backbone=AuxiliaryNet())).fit(X, y)
    assert len(clf.history_) == 3  # 10 images: 3, 3, and 4 (a last one joins)
    untracked = FineTuneClassifier(**tiny_training(backbone=UntrackedPooledNet())).fit(X, y)
    assert untracked.history_[-1]["train_loss"] > 0


def test_batch_size_one_trains_unless_a_batch_norm_sees_one_value_per_channel():
    """batch_size=1 with batch norms over maps trains; after global pooling, refused."""
    X, y = separable_images(n_per_class=3, size=24)
    clf = FineTuneClassifier(**tiny_training(device="cpu", batch_size=1, max_epochs=1))
    assert clf.fit(X, y).history_[0]["train_loss"] > 0
    pooled = FineTuneClassifier(
        **tiny_training(device="cpu", batch_size=1, max_epochs=1, backbone=PooledNormNet())
    )
    with pytest.raises(
        ValueError,
        match=r"batch_size=1 give the network 1 image\(s\) of a batch, but it needs at least 2 "
        r"\(the batch norm 'pool.2' sees one value per channel per image\): use batch_size=2",
    ):
        pooled.fit(X, y)
