"""The input pipeline: batches read (and, on CUDA, copied) ahead while the network runs.

Every estimator reads its images through :func:`device_batches`. A thread pulls the raw
batches of an image source (slicing arrays, or decoding files with the ``num_workers``
loader) up to :data:`AHEAD` batches before the network needs them, so that decoding batch
``n + 1`` overlaps the network's work on batch ``n``. On CUDA the same thread copies each
batch, as it was read (uint8 for 8-bit images: a quarter of float32's bytes), into pinned
host buffers that are reused from batch to batch, and from there to the GPU on a side
stream; resizing and normalization then run on the GPU (:mod:`skdeep._preprocess`).
:class:`RowCollector` brings features back the same way: through reused pinned buffers,
one batch behind, with the NaN check made on the device.

Rules: batches come out in order; at most :data:`AHEAD` batches wait in the queue (and
one more is being read), so memory stays flat; an error in the reading thread (an image
that does not decode, with its path) is raised where the batch is consumed; and when the
consumer stops early or fails, the thread stops and the loader's workers with it.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

AHEAD = 2
"""Batches read ahead of the network (0 reads each batch when it is needed)."""

# Seconds to wait for the reading thread to stop when the consumer failed.
_STOP_WAIT = 5.0

# Pinned buffers are kept for this many batch shapes at most (a last, smaller batch is
# a shape of its own; beyond these, batches are copied from pageable memory).
_PINNED_SHAPES = 4


def device_batches(
    raw_batches: Iterable,
    prepare: Callable[[list], torch.Tensor],
    device: torch.device,
    ahead: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield ``prepare(raw)`` for each raw batch, the next ones read ahead in a thread.

    Parameters
    ----------
    raw_batches : iterable of raw batches
        Lists of runs ``(pixels, value_range)`` (see :data:`skdeep._images.RawBatch`).
    prepare : callable
        Turns a raw batch (its pixels on ``device`` already, on CUDA) into network input.
    device : torch.device
        Where the network runs.
    ahead : int, optional
        Batches to read ahead (default :data:`AHEAD`; 0 reads in the calling thread).
    """
    ahead = AHEAD if ahead is None else ahead
    if ahead == 0:
        for raw in raw_batches:
            yield prepare(raw)
        return
    stager = _CudaStager(device, slots=ahead + 2) if device.type == "cuda" else None
    with ReadAhead(raw_batches, ahead, stager.stage if stager else None) as staged:
        for item in staged:
            yield prepare(stager.ready(item) if stager else item)


class ReadAhead:
    """Iterate ``items`` in a background thread, up to ``ahead`` items before the consumer.

    Use it as a context manager: leaving the block stops the thread (and closes
    ``items``, which stops a DataLoader's workers), whether the consumer finished,
    stopped early or failed. An exception raised while reading is raised to the
    consumer, with its traceback, at the item where it happened.

    Parameters
    ----------
    items : iterable
    ahead : int
        Items waiting in the queue at most (one more may be in the making).
    transform : callable, optional
        Applied to each item in the thread (copying it to the GPU, say).
    """

    _DONE = object()

    def __init__(self, items: Iterable, ahead: int, transform: Callable | None = None):
        self._items = items
        self._transform = transform
        self._queue: queue.Queue = queue.Queue(maxsize=ahead)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="skdeep-read-ahead", daemon=True)

    def __enter__(self) -> Iterator:
        try:
            self._thread.start()
        except BaseException:  # Ctrl-C while the thread starts: it stops at its next item
            self._stop.set()
            raise
        return self._consume()

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        # Unblock a thread waiting to put. One stuck in a read (a stalled network
        # file) cannot be stopped from here: on an error, wait for it a while only;
        # it ends at its next item, and is a daemon meanwhile.
        deadline = time.monotonic() + (_STOP_WAIT if exc_info[0] is not None else math.inf)
        while self._thread.is_alive() and time.monotonic() < deadline:
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass

    def _read(self) -> None:
        iterator = iter(self._items)
        try:
            for item in iterator:
                if self._transform is not None:
                    item = self._transform(item)
                if not self._put(item):
                    return
            self._put(self._DONE)
        except BaseException as exc:  # handed to the consumer, which raises it
            self._put(_Failure(exc))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    def _put(self, item) -> bool:
        """Queue ``item`` unless the consumer stopped; return whether it was queued."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _consume(self) -> Iterator:
        while True:
            item = self._queue.get()
            if item is self._DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item


class _Failure:
    """An exception raised while reading, on its way to the consumer."""

    def __init__(self, error: BaseException):
        self.error = error


class _PinnedPool:
    """Pinned host buffers reused across batches, each busy until its copy has finished."""

    def __init__(self, slots: int):
        self.slots = slots
        self._buffers: OrderedDict[tuple, list] = OrderedDict()

    def take(self, like: torch.Tensor) -> tuple[torch.Tensor, list] | None:
        """Return a free pinned buffer shaped like ``like`` (None: no room for its shape).

        Returns the buffer and its slot ``[buffer, event]``, whose event the caller sets
        once it has queued the copy out of the buffer.
        """
        key = (tuple(like.shape), tuple(like.stride()), like.dtype)
        slots = self._buffers.get(key)
        if slots is None:
            if len(self._buffers) >= _PINNED_SHAPES:
                return None
            slots = self._buffers[key] = []
        self._buffers.move_to_end(key)
        for slot in slots:
            if slot[1] is None or slot[1].query():
                return slot[0], slot
        if len(slots) < self.slots:
            slot = [torch.empty_like(like, pin_memory=True), None]
            slots.append(slot)
            return slot[0], slot
        oldest = min(slots, key=lambda slot: slot[2])
        oldest[1].synchronize()
        return oldest[0], oldest


class _CudaStager:
    """Copies raw batches to the GPU from the reading thread, on a side stream.

    Each run's pixels go into a reused pinned buffer, then to the device with a
    non-blocking copy on a stream of their own; the consumer's stream waits for that
    copy (an event) before it preprocesses the batch.
    """

    def __init__(self, device: torch.device, slots: int):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.pool = _PinnedPool(slots)
        self._copies = 0

    def stage(self, raw: list) -> list:
        """Start copying every run of ``raw`` to the GPU (in the reading thread).

        Batches of one size (arrays, files of one size) go through the reused pinned
        buffers; a ragged batch (runs of several sizes) is copied from pageable memory,
        since pinning a buffer for sizes that do not come back costs more than it saves.
        """
        staged = []
        uniform = len(raw) == 1
        for pixels, value_range in raw:
            taken = self.pool.take(pixels) if uniform and not pixels.is_pinned() else None
            source = pixels
            if taken is not None:
                source, slot = taken
                source.copy_(pixels)
            with torch.cuda.stream(self.stream):
                on_device = source.to(self.device, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
            if taken is not None:
                self._copies += 1
                slot[1:] = [event, self._copies]
            staged.append((on_device, value_range, event))
        return staged

    def ready(self, staged: list) -> list:
        """Make the consumer's stream wait for the copies; return the raw batch on the GPU."""
        current = torch.cuda.current_stream(self.device)
        runs = []
        for on_device, value_range, event in staged:
            current.wait_event(event)
            on_device.record_stream(current)  # allocated on the side stream, used here
            runs.append((on_device, value_range))
        return runs


class RowCollector:
    """Gather batches of feature rows into one float32 array, checking them for NaN.

    On the CPU each batch is checked and written at once. On CUDA the rows are copied
    into reused pinned buffers without waiting, and a batch is checked (with the flag the
    device computed) and written when the next one arrives, so that the GPU goes on
    with the next batch meanwhile.

    Parameters
    ----------
    n_rows : int
        Rows of the result.
    device : torch.device
        Where the rows are computed.
    on_nonfinite : callable
        Returns the exception to raise when rows hold NaN or infinite values.
    """

    def __init__(self, n_rows: int, device: torch.device, on_nonfinite: Callable[[], Exception]):
        self.n_rows = n_rows
        self.device = device
        self.on_nonfinite = on_nonfinite
        self.out: np.ndarray | None = None
        self._start = 0
        self._pending: list = []  # (start, host rows, host flag, event, slot)
        self._free: list = []  # pinned (rows, flag) pairs, reused

    def add(self, rows: torch.Tensor) -> None:
        """Take one batch of rows ``(b, d)``, float32, on the device."""
        if self.out is None:
            self.out = np.empty((self.n_rows, rows.shape[1]), dtype=np.float32)
        start, self._start = self._start, self._start + len(rows)
        if self.device.type != "cuda":
            if not torch.isfinite(rows).all():
                raise self.on_nonfinite()
            self.out[start : start + len(rows)] = rows.numpy()
            return
        finite = torch.isfinite(rows).all()
        host_rows, host_flag = self._pinned(rows)
        host_rows.copy_(rows, non_blocking=True)
        host_flag.copy_(finite, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._pending.append((start, host_rows, host_flag, event))
        if len(self._pending) > 1:
            self._write(self._pending.pop(0))

    def finish(self) -> np.ndarray:
        """Write what is still on its way; return the rows."""
        while self._pending:
            self._write(self._pending.pop(0))
        if self.out is None:
            self.out = np.empty((self.n_rows, 0), dtype=np.float32)
        return self.out

    def _pinned(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for index, (host_rows, _) in enumerate(self._free):
            if host_rows.shape == rows.shape:
                return self._free.pop(index)
        return (
            torch.empty(rows.shape, dtype=torch.float32, pin_memory=True),
            torch.empty((), dtype=torch.bool, pin_memory=True),
        )

    def _write(self, pending) -> None:
        start, host_rows, host_flag, event = pending
        event.synchronize()
        if not bool(host_flag):
            raise self.on_nonfinite()
        self.out[start : start + len(host_rows)] = host_rows.numpy()
        self._free = [*self._free[-2:], (host_rows, host_flag)]
