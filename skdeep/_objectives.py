"""Training objectives: what a training method minimises and which batches it draws.

The training loop (:class:`skdeep._training.Trainer`) is the same for every method;
an objective is what differs. It says which batches a step takes (source only, or
source and target), which layers it taps, and the loss. A new method (CORAL, say)
is a new objective and its tests, not a change to the estimators or the loop:

>>> import torch
>>> def coral(source, target):
...     return (torch.cov(source.T) - torch.cov(target.T)).pow(2).sum() / 4
>>> objective = DivergencePenalty(
...     torch.nn.CrossEntropyLoss(), coral, ["penultimate"], weight=1.0,
...     schedule=constant, target_batches=iter([]), name="coral")

No scikit-learn here.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ._network import LOGITS
from ._taps import LayerFeatures


@dataclass
class StepResult:
    """What one training step reports.

    Attributes
    ----------
    loss : tensor
        The scalar to minimise.
    n_correct : tensor
        Labeled images of the step that the network classified right.
    n_labeled : int
        Labeled images in the step.
    metrics : dict of str to tensor
        Extra scalars, averaged over the epoch's steps into the history.
    """

    loss: torch.Tensor
    n_correct: torch.Tensor
    n_labeled: int
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class Supervised:
    """Cross-entropy (or any criterion) on labeled batches ``(images, labels)``.

    Parameters
    ----------
    criterion : nn.Module
        Called as ``criterion(logits, labels)``; logits arrive in float32.
    """

    def __init__(self, criterion: nn.Module):
        self.criterion = criterion

    def attach(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Context held while training ``model`` (where objectives register taps)."""
        return contextlib.nullcontext()

    def batches(self, source_batches: Iterable) -> Iterable:
        """Return the batches of one epoch, from the labeled ``(images, labels)`` batches."""
        return source_batches

    def step(self, model: nn.Module, batch, progress: float) -> StepResult:
        """Loss of one batch in the training graph; ``progress`` runs from 0 to 1."""
        images, labels = batch
        logits = model(images).float()
        return self._classification(logits, labels)

    def _classification(self, logits: torch.Tensor, labels: torch.Tensor) -> StepResult:
        loss = self.criterion(logits, labels)
        return StepResult(loss, (logits.argmax(1) == labels).sum(), len(labels))

    def calibration_batches(self, images: Iterable[torch.Tensor]) -> Iterable[torch.Tensor]:
        """Input batches for batch-norm recalibration, from the training images."""
        return images


class DivergencePenalty(Supervised):
    """Supervised loss plus a penalty that pulls source and target features together.

    This is Deep Domain Confusion and the Deep Adaptation Network::

        loss = criterion(source) + weight * schedule(progress) * sum over layers of
               divergence(source features, target features)

    Each step runs a source batch and a target batch of the same size through the
    network together; the features of each layer are average-pooled.

    Parameters
    ----------
    criterion : nn.Module
        Loss of the labeled source images.
    divergence : callable
        ``divergence(source_rows, target_rows)``: a differentiable scalar, such as
        :func:`skdeep.losses.mmd`.
    layers : list of str
        Layers compared: module names, ``"penultimate"`` or ``"logits"``.
    layouts : dict, optional
        The layout of each compared layer that is not rows (see
        :func:`skdeep._taps.verified_layouts`).
    weight : float
        Weight of the penalty.
    schedule : callable
        Factor of the weight at training progress p in [0, 1] (:func:`ramp`,
        :func:`constant`).
    target_batches : iterator of tensors
        Endless network-ready target batches (augmented like the source).
    calibration_target_batches : callable, optional
        Returns unaugmented target batches, one for each source batch of the
        recalibration pass: batch-norm statistics then see both domains, as in
        training.
    name : str, default="mmd"
        Name of the penalty in the training history.
    """

    def __init__(
        self,
        criterion: nn.Module,
        divergence: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        layers: list[str],
        weight: float,
        schedule: Callable[[float], float],
        target_batches: Iterator[torch.Tensor],
        calibration_target_batches: Callable[[], Iterable[torch.Tensor]] | None = None,
        name: str = "mmd",
        layouts: dict | None = None,
    ):
        super().__init__(criterion)
        self.divergence = divergence
        self.layers = list(layers)
        self.layouts = dict(layouts or {})
        self.weight = weight
        self.schedule = schedule
        self.target_batches = target_batches
        self.calibration_target_batches = calibration_target_batches
        self.name = name
        self._taps: LayerFeatures | None = None

    @contextlib.contextmanager
    def attach(self, model: nn.Module):
        """Tap the compared layers and the logits while training ``model``."""
        with LayerFeatures(model, [*self.layers, LOGITS], "avg", layouts=self.layouts) as taps:
            self._taps = taps
            try:
                yield
            finally:
                self._taps = None

    def batches(self, source_batches: Iterable) -> Iterator:
        """Return the batches of one epoch, from the labeled ``(images, labels)`` batches."""
        for images, labels in source_batches:
            yield images, labels, next(self.target_batches)[: len(images)]

    def step(self, model: nn.Module, batch, progress: float) -> StepResult:
        if self._taps is None:
            raise RuntimeError("DivergencePenalty.step needs attach(model) around training")
        images, labels, target_images = batch
        n = len(images)
        rows = self._taps.pooled(torch.cat([images, target_images]))
        penalty = sum(
            self.divergence(rows[layer][:n].float(), rows[layer][n:].float())
            for layer in self.layers
        )
        result = self._classification(rows[LOGITS][:n].float(), labels)
        result.loss = result.loss + self.weight * self.schedule(progress) * penalty
        result.metrics[self.name] = penalty
        return result

    def calibration_batches(self, images: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        if self.calibration_target_batches is None:
            yield from images
            return
        for source, target in zip(images, self.calibration_target_batches(), strict=False):
            yield torch.cat([source, target])


def ramp(progress: float) -> float:
    """DANN's schedule ``2 / (1 + exp(-10 p)) - 1``: 0 at the start, near 1 from p = 0.5.

    The penalty then does not act on the random early features of a new head.
    """
    return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0


def constant(progress: float) -> float:
    """Return the full weight from the start."""
    return 1.0
