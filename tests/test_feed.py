"""The input pipeline: order, bounded read-ahead, errors and shutdown, equal results."""

from __future__ import annotations

import multiprocessing
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from skdeep import FeatureExtractor, FineTuneClassifier, _feed
from skdeep._feed import ReadAhead, RowCollector, device_batches

from .conftest import separable_images, tiny_training


def reading_threads() -> list[threading.Thread]:
    """Return the read-ahead threads alive now."""
    return [t for t in threading.enumerate() if t.name == "skdeep-read-ahead" and t.is_alive()]


@pytest.fixture(autouse=True)
def no_thread_or_worker_left():
    """After each test, no read-ahead thread and no loader worker is left running."""
    yield
    assert not reading_threads()
    deadline = time.monotonic() + 10
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not multiprocessing.active_children()


class Counted:
    """Yield 0 .. n-1, noting how far the reader is ahead of the consumer at each item."""

    def __init__(self, n: int, fail_at: int | None = None):
        self.n, self.fail_at = n, fail_at
        self.consumed = 0
        self.lead = []  # items produced minus items consumed, at each production
        self.closed = False

    def __iter__(self):
        """Yield the items, failing at ``fail_at``; note the close."""
        try:
            for item in range(self.n):
                if item == self.fail_at:
                    raise ValueError(f"could not read item {item}")
                self.lead.append(item - self.consumed)
                yield item
        finally:
            self.closed = True


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 25), st.integers(1, 4), st.lists(st.floats(0, 0.002), max_size=5))
def test_items_come_in_order_never_more_than_ahead_before_the_consumer(n, ahead, pauses):
    """Order kept, and the reader stays at most ``ahead`` (+ the one in hand) in front."""
    items = Counted(n)
    seen = []
    with ReadAhead(items, ahead) as stream:
        for index, item in enumerate(stream):
            seen.append(item)
            items.consumed += 1
            if pauses:
                time.sleep(pauses[index % len(pauses)])
    assert seen == list(range(n))
    assert all(lead <= ahead + 1 for lead in items.lead)
    assert items.closed


def test_a_reading_error_reaches_the_consumer_at_its_item():
    """Items before the failure arrive; then the reader's own exception, and the thread ends."""
    items = Counted(10, fail_at=4)
    seen = []
    with pytest.raises(ValueError, match="could not read item 4"):
        with ReadAhead(items, 2) as stream:
            for item in stream:
                seen.append(item)
                items.consumed += 1
    assert seen == [0, 1, 2, 3]
    assert items.closed


def test_a_consumer_that_stops_early_stops_the_reader():
    """Leaving the block after two items closes the source and ends the thread."""
    items = Counted(1000)
    with ReadAhead(items, 2) as stream:
        for item in stream:
            items.consumed += 1
            if item == 1:
                break
    assert items.closed and max(items.lead) <= 3


def test_a_consumer_that_fails_stops_the_reader():
    """An error in the network (the consumer) ends the thread too."""
    items = Counted(1000)
    with pytest.raises(RuntimeError, match="the network failed"):
        with ReadAhead(items, 3) as stream:
            for _ in stream:
                raise RuntimeError("the network failed")
    assert items.closed


def test_ctrl_c_while_the_reading_thread_starts_leaves_no_thread():
    """KeyboardInterrupt inside Thread.start (the thread already runs): it still stops."""
    items = Counted(1000)
    reader = ReadAhead(items, 2)
    start = reader._thread.start

    def interrupted_start():
        start()
        raise KeyboardInterrupt

    reader._thread.start = interrupted_start
    with pytest.raises(KeyboardInterrupt), reader:
        pass
    reader._thread.join(timeout=5)
    assert not reader._thread.is_alive() and items.closed


def test_the_reading_thread_leaves_warning_filters_alone(monkeypatch):
    """Read-only arrays are read without catch_warnings, which is not thread-safe."""
    entered = []
    real = warnings.catch_warnings

    class Watched(real):
        def __enter__(self):
            entered.append(threading.current_thread().name)
            return super().__enter__()

    monkeypatch.setattr(warnings, "catch_warnings", Watched)
    images = np.random.default_rng(0).integers(0, 256, (12, 24, 24, 3), dtype=np.uint8)
    images.setflags(write=False)  # as a memory-mapped array is
    extractor = FeatureExtractor("resnet18", weights=None, image_size=24, batch_size=4)
    extractor.fit_transform(images)
    assert "skdeep-read-ahead" not in entered


def test_a_step_that_fails_leaves_no_reading_thread_even_if_its_error_is_kept(tmp_path):
    """An error kept alive (pytest's excinfo, IPython's last traceback) keeps no reader."""
    X, y = separable_images(n_per_class=6, size=24)
    paths = []
    for index, image in enumerate(X):
        paths.append(str(tmp_path / f"{index}.png"))
        Image.fromarray(image).save(paths[-1])
    params = tiny_training(backbone=FailingNet(), batch_size=4, num_workers=2)
    with pytest.raises(RuntimeError, match="the third batch") as kept:
        FineTuneClassifier(**params).fit(paths, y)
    assert kept.value is not None  # the traceback (and its frames) still alive here
    assert not reading_threads()
    deadline = time.monotonic() + 10
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not multiprocessing.active_children()


class FailingNet(torch.nn.Module):
    """A network whose third training batch raises."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(4, 2)
        self.batches = 0

    def forward(self, x):
        """Classify; raise on the third training batch."""
        if self.training:
            self.batches += 1
            if self.batches == 3:
                raise RuntimeError("the third batch")
        return self.fc(self.pool(self.features(x)).flatten(1))


def test_device_batches_equal_with_and_without_reading_ahead():
    """The same prepared batches, in the same order, whichever way they are read."""
    raw = [[(torch.full((2, 3, 4, 4), i, dtype=torch.uint8), (0.0, 255.0))] for i in range(7)]

    def prepare(batch):
        return batch[0][0].float() + 1

    device = torch.device("cpu")
    ahead = list(device_batches(raw, prepare, device))
    inline = list(device_batches(raw, prepare, device, ahead=0))
    assert len(ahead) == len(inline) == 7
    for a, b in zip(ahead, inline, strict=True):
        assert torch.equal(a, b)


def test_features_and_training_are_the_same_with_and_without_reading_ahead(monkeypatch):
    """AHEAD = 0 (read in the calling thread) and the default give equal results."""
    X, y = separable_images(n_per_class=10, size=24)
    results = []
    for ahead in (0, _feed.AHEAD):
        monkeypatch.setattr(_feed, "AHEAD", ahead)
        extractor = FeatureExtractor(
            "resnet18", weights=None, image_size=24, random_state=0, batch_size=6
        )
        clf = FineTuneClassifier(**tiny_training(augment="crop", batch_size=6)).fit(X, y)
        results.append(
            (extractor.fit_transform(X), [r["train_loss"] for r in clf.history_], clf.predict(X))
        )
    (features_0, losses_0, labels_0), (features_2, losses_2, labels_2) = results
    np.testing.assert_array_equal(features_0, features_2)
    assert losses_0 == losses_2
    np.testing.assert_array_equal(labels_0, labels_2)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_file_that_fails_to_decode_is_named_and_leaves_nothing_running(tmp_path, num_workers):
    """The error names the file; no thread or loader worker outlives it (checked after)."""
    paths = []
    rng = np.random.default_rng(0)
    for index in range(12):
        path = tmp_path / f"photo_{index}.png"
        if index == 7:
            path.write_bytes(b"not a png")
        else:
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    extractor = FeatureExtractor(
        "resnet18", weights=None, image_size=16, batch_size=2, num_workers=num_workers
    )
    with pytest.raises(ValueError, match=r"could not read the image file '.*photo_7.png'"):
        extractor.fit_transform(paths)


def test_rows_are_collected_in_order_and_nan_is_refused():
    """RowCollector writes each batch at its place; a NaN row raises the error given."""
    collector = RowCollector(5, torch.device("cpu"), lambda: FloatingPointError("NaN rows"))
    collector.add(torch.arange(6, dtype=torch.float32).reshape(3, 2))
    collector.add(torch.arange(6, 10, dtype=torch.float32).reshape(2, 2))
    np.testing.assert_array_equal(collector.finish(), np.arange(10).reshape(5, 2))
    failing = RowCollector(2, torch.device("cpu"), lambda: FloatingPointError("NaN rows"))
    with pytest.raises(FloatingPointError, match="NaN rows"):
        failing.add(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_batches_are_staged_through_reused_pinned_buffers():
    """Many batches of one shape reuse a few pinned buffers; the GPU gets the same pixels."""
    device = torch.device("cuda")
    raw = [[(torch.full((4, 3, 8, 8), i, dtype=torch.uint8), (0.0, 255.0))] for i in range(20)]
    stager = _feed._CudaStager(device, slots=4)
    out = list(device_batches(raw, lambda batch: batch[0][0].cpu(), device))
    for i, batch in enumerate(out):
        assert torch.equal(batch, raw[i][0][0])
    for pixels, _ in raw[0]:
        stager.stage([(pixels, (0.0, 255.0))])
    assert sum(len(slots) for slots in stager.pool._buffers.values()) <= 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_rows_come_back_one_batch_behind_and_nan_is_refused():
    """Rows copied back without waiting still land in order; a NaN batch raises."""
    device = torch.device("cuda")
    collector = RowCollector(9, device, lambda: FloatingPointError("NaN rows"))
    for start in range(0, 9, 3):
        collector.add(torch.arange(start * 2, (start + 3) * 2, device=device).float().view(3, 2))
    np.testing.assert_array_equal(collector.finish(), np.arange(18).reshape(9, 2))
    failing = RowCollector(4, device, lambda: FloatingPointError("NaN rows"))
    failing.add(torch.tensor([[0.0, float("nan")]], device=device).expand(2, 2))
    with pytest.raises(FloatingPointError, match="NaN rows"):
        failing.add(torch.zeros(2, 2, device=device))
        failing.finish()
