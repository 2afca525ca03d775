"""The data plan: which rows each rank trains at each step, and the seeds they share.

Training is cut into steps. At every step the ranks (one process alone, or the ``n``
processes of ``devices=n``) take one *global batch* together, each its own equal
*part* of it. This module, and only this one, decides those parts, from the number of
rows, ``batch_size``, the world size, the epoch and a seed that every rank agrees on.
Its rules:

1. **One seed for all ranks.** The seed comes from ``random_state``; when that is None,
   rank 0 draws one and broadcasts it (:func:`agree_seed`), in spawned and ``torchrun``
   runs alike. Every rank then shuffles, splits validation rows, draws target batches
   and initialises new modules (the head, a domain classifier) alike. Streams that must
   differ between ranks (dropout) are seeded by :func:`rank_seed`, which is the shared
   seed itself on rank 0, so that one process draws what it always drew.
2. **Every row once per epoch, the same number of steps on every rank.** An epoch
   shuffles the rows (:meth:`DataPlan.epoch`) and cuts them into global batches of
   ``batch_size`` rows. The last, smaller batch is padded up to a multiple of the
   world size by repeating the first rows of the epoch's order (as PyTorch's
   ``DistributedSampler`` pads): fewer than ``world_size`` rows are repeated per epoch,
   none is dropped. Every rank takes ``steps_per_epoch`` steps.
3. **No part too small for batch norm.** While a trained batch norm sees a single value
   per channel for one image (1x1 maps after pooling, or a 1-D batch norm over rows),
   every part holds at least :data:`MIN_PART_WITH_BATCH_NORM` images, since such a
   batch norm cannot train on one; batch norms over larger maps train on one image.
   A last batch whose parts would be smaller is merged into the batch before it, so
   that batch holds up to ``(MIN_PART_WITH_BATCH_NORM - 1) * world_size`` rows more
   than ``batch_size``. :class:`DataPlan` refuses, with an error that names
   ``batch_size``, ``devices`` and the number of rows (before any process starts),
   when ``batch_size`` is below ``min_part * world_size`` or the rows are no more
   than ``(min_part - 1) * world_size``.
4. **Target batches cycle over any count.** Each step's target batch (domain
   adaptation) has the size of its source batch and is split the same way. The target
   rows are drawn as an endless stream of shuffled passes, one pass after the other
   across steps and epochs, so that one target image serves as well as thousands.

So a world of ``n`` ranks takes the global batches of one process whenever the last
batch of an epoch needs neither padding nor merging for ``n`` ranks: ``rows %
batch_size`` is 0, or a multiple of ``n`` larger than ``(min_part - 1) * n``.

No torch here, except :func:`agree_seed` (one broadcast) and :func:`regroup`, which
applies the plan's step sizes to loaded batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

MIN_PART_WITH_BATCH_NORM = 2
"""The fewest images of a rank's part while a trained batch norm sees one value per
channel per image (after global pooling, say): it cannot train on one image."""

# The two random streams of a plan (source and target rows), told apart in the seeds.
_SOURCE_STREAM, _TARGET_STREAM = 0, 1


@dataclass(frozen=True)
class Step:
    """One rank's part of one global batch.

    Attributes
    ----------
    rows : ndarray of int
        Positions of this rank's rows among the rows the plan covers.
    share : slice
        Where the part sits in the global batch (random draws of the whole batch, such
        as augmentation, are sliced with it).
    global_size : int
        Images in the global batch, padding included.
    """

    rows: np.ndarray
    share: slice
    global_size: int


class DataPlan:
    """Which rows each rank takes at each step of training (see the module's rules).

    Parameters
    ----------
    n_rows : int
        Training rows (after any validation split).
    batch_size : int
        Rows of a global batch; a multiple of ``world_size``.
    world_size, rank : int, default=1 and 0
        The ranks training together, and which one this plan is for.
    seed : int, default=0
        The seed every rank agrees on (:func:`agree_seed`).
    min_part : int, default=1
        The fewest images of a part: :data:`MIN_PART_WITH_BATCH_NORM` while a trained
        batch norm sees one value per channel per image.
    devices : object, optional
        The ``devices`` parameter as the user gave it, for error messages.
    why : str, optional
        Why parts need ``min_part`` images, for error messages.
    rows : str, optional
        What the rows are, for error messages ("training image(s)").
    domains_apart : bool, default=False
        Whether each step runs source and target images through the network apart
        (``batch_norm="per_domain"``): DistributedDataParallel allows one forward pass
        per step, so only one rank can train that way.

    Raises
    ------
    ValueError
        No rows; ``batch_size`` not a multiple of ``world_size``; parts of fewer than
        ``min_part`` images that no cut avoids; domains apart on several ranks.
    """

    def __init__(
        self,
        n_rows: int,
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        min_part: int = 1,
        devices=None,
        domains_apart: bool = False,
        why: str = "batch norm cannot train on one image",
        rows: str = "training image(s)",
    ):
        self.n_rows, self.batch_size = int(n_rows), int(batch_size)
        self.world_size, self.rank = int(world_size), int(rank)
        self.seed, self.min_part = int(seed), int(min_part)
        # The settings to name: batch_size, and devices when the user gave it.
        settings = f"batch_size={batch_size}" + (
            f" and devices={devices!r}" if devices is not None else ""
        )
        parts = "each process" if self.world_size > 1 else "the network"
        if self.n_rows < 1:
            raise ValueError(f"no {rows}: fit needs at least one labeled image to train on")
        if domains_apart and self.world_size > 1:
            raise ValueError(
                "batch_norm='per_domain' runs source and target through the network apart, "
                "which DistributedDataParallel does not allow within one step; use "
                f"batch_norm='joint' with devices={devices!r}"
            )
        if self.batch_size % self.world_size:
            raise ValueError(
                f"batch_size={batch_size} must be a multiple of the {world_size} processes "
                f"of devices={devices!r}: it is the global batch, which the processes "
                "share out equally"
            )
        if self.batch_size // self.world_size < self.min_part:
            raise ValueError(
                f"{settings} give {parts} {self.batch_size // self.world_size} image(s) "
                f"of a batch, but it needs at least {self.min_part} ({why}): use "
                f"batch_size={self.min_part * self.world_size} or more"
            )
        fewest = (self.min_part - 1) * self.world_size + 1
        if self.n_rows < fewest:
            raise ValueError(
                f"{self.n_rows} {rows} with {settings} give {parts} "
                f"{math.ceil(self.n_rows / self.world_size)} image(s) at a step, but it needs "
                f"at least {self.min_part} ({why}): train on at least {fewest} images"
                + (", use fewer processes" if self.world_size > 1 else "")
                + ", or freeze the batch norms (freeze='backbone')"
            )
        self.sizes = _batch_sizes(self.n_rows, self.batch_size, self.world_size, self.min_part)

    @property
    def steps_per_epoch(self) -> int:
        """Steps of an epoch, the same on every rank."""
        return len(self.sizes)

    def padded(self, size: int) -> int:
        """Images of a global batch of ``size`` rows once padded to split evenly."""
        return math.ceil(size / self.world_size) * self.world_size

    def epoch(self, epoch: int) -> list[Step]:
        """Return this rank's steps of ``epoch`` (from 1): the rows shuffled with the seed."""
        order = _permutation(self.seed, _SOURCE_STREAM, epoch, self.n_rows)
        return self._steps(order, self.sizes)

    def in_order(self) -> list[Step]:
        """Return this rank's steps over the rows in their order (a recalibration pass)."""
        return self._steps(np.arange(self.n_rows), self.sizes)

    def target_epoch(self, epoch: int, n_target: int) -> list[Step]:
        """Return this rank's target rows at each step of ``epoch``, as many as its source rows.

        Step by step, the target rows come from an endless stream of shuffled passes
        over the ``n_target`` rows, continued across epochs: position ``q`` of the
        stream is element ``q % n_target`` of pass ``q // n_target``.
        """
        per_epoch = sum(self.padded(size) for size in self.sizes)
        start = (epoch - 1) * per_epoch
        passes = range(start // n_target, (start + per_epoch - 1) // n_target + 1)
        stream = np.concatenate(
            [_permutation(self.seed, _TARGET_STREAM, index, n_target) for index in passes]
        )
        offset = start - passes[0] * n_target
        return self._padded_steps(stream[offset : offset + per_epoch])

    def target_in_order(self, n_target: int) -> list[Step]:
        """Target rows in their order, cycled, in the steps of :meth:`in_order`."""
        per_epoch = sum(self.padded(size) for size in self.sizes)
        return self._padded_steps(np.arange(per_epoch) % n_target)

    def _steps(self, order: np.ndarray, sizes: list[int]) -> list[Step]:
        """Cut ``order`` into global batches of ``sizes``, pad each, and take this rank's parts."""
        batches, start = [], 0
        for size in sizes:
            batch = order[start : start + size]
            padding = self.padded(size) - size
            if padding:  # the first rows of the order, as DistributedSampler pads
                batch = np.concatenate([batch, np.resize(order, padding)])
            batches.append(batch)
            start += size
        return self._parts(batches)

    def _padded_steps(self, stream: np.ndarray) -> list[Step]:
        """Cut a stream already as long as the padded batches into them; take the parts."""
        bounds = np.cumsum([self.padded(size) for size in self.sizes])[:-1]
        return self._parts(np.split(stream, bounds))

    def _parts(self, batches: list[np.ndarray]) -> list[Step]:
        steps = []
        for batch in batches:
            part = len(batch) // self.world_size
            share = slice(self.rank * part, (self.rank + 1) * part)
            steps.append(Step(batch[share], share, len(batch)))
        return steps


def _batch_sizes(n_rows: int, batch_size: int, world_size: int, min_part: int) -> list[int]:
    """Rows of each global batch (before padding): full ones, then the rest or a merge."""
    full, rest = divmod(n_rows, batch_size)
    sizes = [batch_size] * full
    if rest:
        if math.ceil(rest / world_size) >= min_part or not sizes:
            sizes.append(rest)
        else:  # parts of the rest alone would be too small for batch norm
            sizes[-1] += rest
    return sizes


def _permutation(seed: int, stream: int, index: int, n: int) -> np.ndarray:
    """Return the ``index``-th shuffle of ``n`` rows in one of the plan's random streams."""
    return np.random.default_rng([seed, stream, index]).permutation(n)


def evaluation_rows(rows: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Return this rank's share of rows that are only scored (validation), contiguous.

    Scoring sums over ranks, so the shares need not be equal, and nothing is padded.
    """
    return np.array_split(rows, world_size)[rank]


def fresh_seed() -> int:
    """Draw a seed from the operating system's entropy (for ``random_state=None``)."""
    return int(np.random.SeedSequence().generate_state(1)[0] >> 1)


def agree_seed(seed: int | None, context=None) -> int:
    """Return the seed every rank uses: ``seed``, or rank 0's fresh one when it is None.

    Alone (``context`` None), a None seed becomes a fresh one. Among ranks, rank 0's
    value is broadcast, so all ranks agree even when ``random_state`` is None.
    """
    value = fresh_seed() if seed is None else int(seed)
    if context is None:
        return value
    return context.broadcast_int(value)


def rank_seed(seed: int, rank: int) -> int:
    """Return the seed of a stream that differs between ranks (dropout): ``seed`` on rank 0."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0] >> 1)


def regroup(batches: Iterable[torch.Tensor], sizes: Iterable[int]) -> Iterator[torch.Tensor]:
    """Re-cut consecutive ``batches`` into batches of ``sizes`` (the plan's steps).

    The images are loaded in batches of one regular size; a step of another size (a
    merged last batch) takes the images of several of them.
    """
    pending: list[torch.Tensor] = []
    held = 0
    batches = iter(batches)
    for size in sizes:
        while held < size:
            batch = next(batches)
            pending.append(batch)
            held += len(batch)
        joined = pending[0] if len(pending) == 1 else torch.cat(pending)
        yield joined[:size]
        rest = joined[size:]
        pending, held = ([rest] if len(rest) else []), len(rest)
