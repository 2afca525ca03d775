"""Tests of data-parallel training (``devices``): gloo on the CPU, two processes.

Every fit here asks for device="cpu", so that a machine with one GPU runs them too.

Every spawned process listens on 127.0.0.1 only and is stopped by ``fit`` itself, even
when a rank fails; the tests check that none is left behind.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from torch import nn

from skdeep import DomainAdaptedClassifier, FineTuneClassifier

from .conftest import TinyNet, separable_images, tiny_training


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
        if self.training and torch.distributed.is_initialized():
            RaisingNet.batches += 1
            if torch.distributed.get_rank() == 1 and RaisingNet.batches == 2:
                raise ValueError("rank 1 could not go on")
        return super().forward(x)


class KilledNet(TinyNet):
    """TinyNet whose rank 1 is killed by SIGKILL on its second training batch."""

    batches = 0

    def forward(self, x):
        """Kill rank 1's process on its second batch."""
        if self.training and torch.distributed.is_initialized():
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
    """Pickles load and predict in one process; clone keeps devices; GridSearchCV works."""
    X, y = separable_images(n_per_class=12, size=24)
    clf = FineTuneClassifier(**tiny_training(device="cpu", devices=2, max_epochs=1)).fit(X, y)
    restored = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(restored.predict(X), clf.predict(X))
    assert clone(clf).get_params()["devices"] == 2 and not hasattr(clone(clf), "model_")
    search = GridSearchCV(
        FineTuneClassifier(**tiny_training(device="cpu", devices=2, max_epochs=1)),
        {"lr": [0.01]},
        cv=2,
    ).fit(X, y)
    assert search.best_estimator_.devices == 2 and 0 <= search.best_score_ <= 1


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
from tests.conftest import separable_images, tiny_training

if __name__ == "__main__":
    X, y = separable_images(n_per_class=12, size=24)
    recalibrate = sys.argv[2] == "recalibrate"
    params = tiny_training(device="cpu", devices=2, max_epochs=2, recalibrate_bn=recalibrate)
    clf = FineTuneClassifier(**params).fit(X, y)
    rank = torch.distributed.get_rank()
    np.save(sys.argv[1] + f"/rank{rank}.npy", clf.predict_proba(X))
"""


@pytest.mark.parametrize("recalibration", ["recalibrate", "none"])
def test_torchrun_ranks_join_its_group_and_end_alike(tmp_path, recalibration):
    """Under torchrun --nproc-per-node 2, fit joins the group; both ranks predict alike.

    Batch norms are not synchronized (the default): the ranks' running statistics come
    from a recalibration over the global batches, or are rank 0's.
    """
    script = tmp_path / "train.py"
    script.write_text(TORCHRUN_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    environment = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(script), str(tmp_path), recalibration,
    ]  # fmt: skip
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy")
    np.testing.assert_array_equal(first, second)
    assert first.shape == (24, 2)
