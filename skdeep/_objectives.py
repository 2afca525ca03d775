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
import inspect
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ._network import LOGITS
from ._taps import LayerFeatures
from .losses import class_confusion_loss, information_loss


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
    calibration_target_batches : callable, optional
        Returns unaugmented target batches, one for each source batch of the
        batch-norm recalibration pass after training (None: the source alone).
    calibrate_on : {"both", "target"}, default="both"
        With target batches: take the recalibration statistics from source and target
        batches together, or from the target batches alone (the statistics the
        network then predicts the target with, as AdaBN does).
    """

    def __init__(
        self,
        criterion: nn.Module,
        calibration_target_batches: Callable[[], Iterable[torch.Tensor]] | None = None,
        calibrate_on: str = "both",
    ):
        if calibrate_on not in ("both", "target"):
            raise ValueError(f"calibrate_on must be 'both' or 'target'; got {calibrate_on!r}")
        self.criterion = criterion
        self.calibration_target_batches = calibration_target_batches
        self.calibrate_on = calibrate_on
        self._context = None  # the ranks, in data-parallel training

    def attach(self, model: nn.Module, forward=None) -> contextlib.AbstractContextManager:
        """Context held while training ``model`` (where objectives register taps).

        ``forward`` is what batches run through, when not ``model`` itself (a
        DistributedDataParallel wrapper of it).
        """
        return contextlib.nullcontext()

    def parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the objective itself, which the optimizer adds."""
        return []

    def distribute(self, context) -> None:
        """Prepare for data-parallel steps among the ranks of ``context``.

        Called once before training when several ranks train together
        (:class:`~skdeep._distributed.DistributedContext`): a class-weighted loss is then
        normalized by the weights of the whole global batch.
        """
        self._context = context

    def batches(self, source_batches: Iterable) -> Iterable:
        """Return the batches of one epoch, from the labeled ``(images, labels)`` batches."""
        return source_batches

    def close(self) -> None:
        """Release what the objective reads from (nothing here), once training ends."""

    def step(self, model: nn.Module, batch, progress: float) -> StepResult:
        """Loss of one batch in the training graph; ``progress`` runs from 0 to 1."""
        images, labels = batch
        logits = model(images).float()
        return self._classification(logits, labels)

    def _classification(self, logits: torch.Tensor, labels: torch.Tensor) -> StepResult:
        loss = self._loss(logits, labels)
        return StepResult(loss, (logits.argmax(1) == labels).sum(), len(labels))

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Compute the criterion as one process would on the whole global batch.

        A class-weighted cross-entropy is a weighted mean: its sum is divided by the
        sum of the weights of the rows. On one rank that would be the weights of its own
        part, and DistributedDataParallel's average of such ratios is not the global
        weighted mean; so each rank divides its sum by the global sum of weights (times
        the ranks, which the gradient average divides by again). Without class weights
        every part holds as many rows, and the plain mean already agrees.
        """
        criterion = self.criterion
        weight = getattr(criterion, "weight", None)
        if (
            self._context is None
            or weight is None
            or not isinstance(criterion, nn.CrossEntropyLoss)
        ):
            return criterion(logits, labels)
        per_row = nn.functional.cross_entropy(
            logits,
            labels,
            weight=weight,
            reduction="none",
            label_smoothing=criterion.label_smoothing,
        )
        total_weight = self._context.sum(weight[labels].sum())
        return per_row.sum() * self._context.world_size / total_weight

    def calibration_batches(self, images: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Input batches for batch-norm recalibration, from the source training images."""
        if self.calibration_target_batches is None:
            yield from images
        elif self.calibrate_on == "target":
            yield from self.calibration_target_batches()
        else:
            for source, target in zip(images, self.calibration_target_batches(), strict=False):
                yield torch.cat([source, target])


class DomainAlignment(Supervised):
    """Supervised loss on source batches plus a term that aligns the domains' features.

    Each step draws a batch of unlabeled target images of the size of the labeled
    source batch, taps ``layers`` of the network (average-pooled) for both, and adds
    :meth:`alignment` to the criterion of the source images. Subclasses say what the
    alignment is: a divergence (:class:`DivergencePenalty`) or a domain classifier
    (:class:`AdversarialPenalty`).

    Parameters
    ----------
    criterion : nn.Module
        Loss of the labeled source images.
    layers : list of str
        Layers whose features are aligned: module names, ``"penultimate"`` or
        ``"logits"``.
    weight : float
        Weight of the alignment.
    schedule : callable
        Factor of the weight at training progress p in [0, 1] (:func:`ramp`,
        :func:`constant`).
    target_batches : iterator of tensors
        Endless network-ready target batches (augmented like the source).
    layouts : dict, optional
        The layout of each layer that is not rows (see
        :func:`skdeep._taps.verified_layouts`).
    separate_passes : bool, default=False
        Run source and target batches through the network apart, so that batch norms
        normalize each domain with its own statistics (as AdaBN does at test time),
        instead of together.
    calibration_target_batches, calibrate_on
        As in :class:`Supervised`.
    information_weight : float, default=0.0
        Weight of :func:`skdeep.losses.information_loss` on the target images' logits
        (confident and diverse predictions), scheduled like the alignment.
    class_confusion_weight : float, default=0.0
        Weight of :func:`skdeep.losses.class_confusion_loss` on the target images'
        logits (Minimum Class Confusion), scheduled like the alignment.
    gather : callable, optional
        In data-parallel training, concatenates every rank's rows (with gradients),
        so that the alignment compares the global batches of both domains, as one
        process would.
    name : str
        Name of the alignment in the training history.
    """

    name = "alignment"

    def __init__(
        self,
        criterion: nn.Module,
        layers: list[str],
        weight: float,
        schedule: Callable[[float], float],
        target_batches: Iterator[torch.Tensor],
        layouts: dict | None = None,
        separate_passes: bool = False,
        calibration_target_batches: Callable[[], Iterable[torch.Tensor]] | None = None,
        calibrate_on: str = "both",
        information_weight: float = 0.0,
        class_confusion_weight: float = 0.0,
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
        name: str | None = None,
    ):
        super().__init__(criterion, calibration_target_batches, calibrate_on)
        # Losses on the target images' predictions: (history name, weight, loss).
        self.prediction_terms = [
            (name, term_weight, loss)
            for name, term_weight, loss in (
                ("information", information_weight, information_loss),
                ("class_confusion", class_confusion_weight, class_confusion_loss),
            )
            if term_weight
        ]
        self.gather = gather
        self.layers = list(layers)
        self.weight = weight
        self.schedule = schedule
        self.target_batches = target_batches
        self.layouts = dict(layouts or {})
        self.separate_passes = separate_passes
        self.name = name or self.name
        self._taps: LayerFeatures | None = None

    @contextlib.contextmanager
    def attach(self, model: nn.Module, forward=None):
        """Tap the aligned layers and the logits while training ``model``."""
        layers = [*self.layers, LOGITS]
        with LayerFeatures(model, layers, "avg", layouts=self.layouts, forward=forward) as taps:
            self._taps = taps
            try:
                yield
            finally:
                self._taps = None

    def distribute(self, context) -> None:
        """Compare the features of every rank's rows: gather them, with gradients."""
        super().distribute(context)
        self.gather = context.gather

    def close(self) -> None:
        """Close the endless target batches (their reading thread ends with them)."""
        close = getattr(self.target_batches, "close", None)
        if close is not None:
            close()

    def batches(self, source_batches: Iterable) -> Iterator:
        """Return the batches of one epoch, from the labeled ``(images, labels)`` batches."""
        for images, labels in source_batches:
            yield images, labels, next(self.target_batches)[: len(images)]

    def features(self, images, target_images) -> tuple[dict, dict]:
        """Pooled rows of every tapped layer for the source and the target images."""
        if self._taps is None:
            raise RuntimeError(f"{type(self).__name__}.step needs attach(model) around training")
        if self.separate_passes:
            return self._taps.pooled(images), self._taps.pooled(target_images)
        n = len(images)
        rows = self._taps.pooled(torch.cat([images, target_images]))
        return {k: v[:n] for k, v in rows.items()}, {k: v[n:] for k, v in rows.items()}

    def step(self, model: nn.Module, batch, progress: float) -> StepResult:
        images, labels, target_images = batch
        source, target = self.features(images, target_images)
        result = self._classification(source[LOGITS].float(), labels)
        if self.gather is not None:  # the alignment sees every rank's rows
            source = {layer: self.gather(rows) for layer, rows in source.items()}
            target = {layer: self.gather(rows) for layer, rows in target.items()}
            labels = self.gather(labels)
        factor = self.schedule(progress)
        loss, measured = self.alignment(source, target, self.weight * factor, labels)
        result.loss = result.loss + loss
        result.metrics[self.name] = measured
        for name, term_weight, prediction_loss in self.prediction_terms:
            value = prediction_loss(target[LOGITS])
            result.loss = result.loss + term_weight * factor * value
            result.metrics[name] = value
        return result

    def alignment(self, source: dict, target: dict, weight: float, labels: torch.Tensor):
        """Return the term added to the loss and the discrepancy to record.

        ``source`` and ``target`` hold each tapped layer's pooled rows; ``weight`` is
        the weight at this step of training; ``labels``, the source rows' classes.
        """
        raise NotImplementedError


class DivergencePenalty(DomainAlignment):
    """A divergence between source and target features, added to the supervised loss.

    Deep Domain Confusion, the Deep Adaptation Network (MMD) and Deep CORAL (see
    :class:`JointDivergencePenalty` for a divergence that also reads labels)::

        loss = criterion(source) + weight * schedule(progress) * sum over layers of
               divergence(source features, target features)

    Parameters
    ----------
    criterion : nn.Module
        Loss of the labeled source images.
    divergence : callable
        ``divergence(source_rows, target_rows)``: a differentiable scalar, such as
        :func:`skdeep.losses.mmd` or :func:`skdeep.losses.coral`.
    layers, weight, schedule, target_batches, **options
        As in :class:`DomainAlignment`.
    """

    name = "mmd"

    def __init__(self, criterion, divergence, layers, weight, schedule, target_batches, **options):
        super().__init__(criterion, layers, weight, schedule, target_batches, **options)
        self.divergence = divergence

    def alignment(self, source: dict, target: dict, weight: float, labels: torch.Tensor):
        extra = self.label_arguments(target, labels)
        penalty = sum(
            self.divergence(source[layer].float(), target[layer].float(), *extra)
            for layer in self.layers
        )
        return weight * penalty, penalty

    def label_arguments(self, target: dict, labels: torch.Tensor) -> tuple:
        """Return what the divergence takes after the rows: nothing here."""
        return ()


class CheckedDivergence:
    """A user's divergence, its signature checked once and its value at every call.

    A callable that returns something other than one finite, differentiable value
    would fail deep inside torch, or train on NaN and blame the learning rate; this
    wrapper stops with an error that names the ``divergence`` parameter instead.

    Parameters
    ----------
    function : callable
        ``function(source_rows, target_rows)``.
    argument : str, default="divergence"
        The parameter's name, for the messages.

    Raises
    ------
    TypeError
        ``function`` does not take two arguments.
    """

    def __init__(self, function: Callable, argument: str = "divergence"):
        self.function = function
        self.argument = argument
        self.name = getattr(function, "__name__", type(function).__name__)
        try:
            signature = inspect.signature(function)
        except (TypeError, ValueError):  # builtins without a signature: trusted
            return
        try:
            signature.bind(None, None)
        except TypeError:
            raise TypeError(
                f"{argument} must take two arguments, the source and the target rows "
                f"(divergence(source_rows, target_rows)); {self.name} takes {signature}"
            ) from None

    def __call__(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the divergence of the rows, a 0-dimensional tensor, once checked."""
        value = self.function(source, target)
        where = f"{self.argument}={self.name}"
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{where} must return a tensor holding one value (a differentiable "
                f"scalar); it returned {type(value).__name__}"
            )
        if value.numel() != 1:
            raise ValueError(
                f"{where} must return one value (a scalar tensor); it returned a tensor "
                f"of shape {tuple(value.shape)} for rows of shapes {tuple(source.shape)} "
                f"and {tuple(target.shape)}"
            )
        if not torch.isfinite(value).all() and torch.isfinite(source).all():
            if torch.isfinite(target).all():
                raise ValueError(
                    f"{where} returned {value.item()} on finite rows (shapes "
                    f"{tuple(source.shape)} and {tuple(target.shape)}); it must return a "
                    "finite value"
                )
        wants_gradient = torch.is_grad_enabled() and (source.requires_grad or target.requires_grad)
        if wants_gradient and not value.requires_grad:
            raise ValueError(
                f"{where} returned a value without a gradient (computed outside torch, or "
                "detached), so it cannot train the network; compute it with torch "
                "operations on the rows it receives"
            )
        return value.reshape(())


class JointDivergencePenalty(DivergencePenalty):
    """A divergence between the joint distributions of features and labels.

    As :class:`DivergencePenalty`, but the divergence also receives the source labels
    and the target images' predicted class probabilities, as pseudo-labels (detached),
    so that it can align each class with itself (:func:`skdeep.losses.joint_mmd`).

    Parameters
    ----------
    criterion, layers, weight, schedule, target_batches, **options
        As in :class:`DivergencePenalty`.
    divergence : callable
        ``divergence(source_rows, target_rows, source_labels, target_probabilities)``.
    """

    name = "joint_mmd"

    def label_arguments(self, target: dict, labels: torch.Tensor) -> tuple:
        """Return the source labels and the target's class probabilities, detached."""
        # Pseudo-labels: with gradients through them, the network can shrink the
        # discrepancy by blurring its target predictions instead of moving features
        # (one screened fit fell to 52 % target accuracy that way).
        probabilities = torch.softmax(target[LOGITS].float(), dim=1).detach()
        return labels, probabilities


class GradientReversal(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``-coefficient`` backward."""

    @staticmethod
    def forward(ctx, inputs: torch.Tensor, coefficient: float) -> torch.Tensor:
        ctx.coefficient = coefficient
        return inputs.view_as(inputs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.coefficient * grad, None


def domain_classifier(width: int, hidden: int = 1024) -> nn.Module:
    """DANN's domain classifier: two hidden layers of ``hidden`` units with dropout."""
    return nn.Sequential(
        nn.Linear(width, hidden),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(hidden, 1),
    )


class AdversarialPenalty(DomainAlignment):
    """Domain-adversarial training (DANN, Ganin et al. 2016).

    A domain classifier learns to tell source features (label 0) from target features
    (label 1) with a binary cross-entropy; between it and the network, a gradient
    reversal layer turns that loss into one the network maximises, so that the
    features become indistinguishable::

        loss = criterion(source) + domain_loss(classifier(reverse(features, w)))

    where ``reverse`` is the identity forward and multiplies gradients by
    ``-w = -weight * schedule(progress)`` backward (DANN's usual schedule is
    :func:`ramp`). The features of all ``layers`` are concatenated. The history
    records the domain loss: ln 2 = 0.69 when the classifier can no longer tell.

    Parameters
    ----------
    criterion, layers, weight, schedule, target_batches, **options
        As in :class:`DomainAlignment`.
    classifier : nn.Module
        The domain classifier (see :func:`domain_classifier`): rows in, one logit out.
        Trained along with the network (see :meth:`parameters`).
    """

    name = "adversarial"

    def __init__(self, criterion, classifier, layers, weight, schedule, target_batches, **options):
        super().__init__(criterion, layers, weight, schedule, target_batches, **options)
        self.classifier = classifier
        self._classify = classifier  # what rows run through: a DDP wrapper among ranks

    def distribute(self, context) -> None:
        """Gather features, and train one domain classifier on every rank.

        The classifier is wrapped in DistributedDataParallel: rank 0's initial weights
        reach every rank, and its gradients are averaged, so that the ranks' classifiers
        stay equal although each draws its own dropout.
        """
        super().distribute(context)
        self._classify = context.wrap(self.classifier)

    @contextlib.contextmanager
    def attach(self, model: nn.Module, forward=None):
        """Train the domain classifier along with ``model``."""
        self.classifier.train()
        with super().attach(model, forward):
            yield
        self.classifier.eval()

    def parameters(self) -> list[nn.Parameter]:
        """Return the domain classifier's parameters: the optimizer trains them too."""
        return list(self.classifier.parameters())

    def alignment(self, source: dict, target: dict, weight: float, labels: torch.Tensor):
        rows = torch.cat(
            [torch.cat([source[layer], target[layer]]).float() for layer in self.layers],
            dim=1,
        )
        logits = self._classify(GradientReversal.apply(rows, weight)).squeeze(1)
        n = len(source[self.layers[0]])
        domains = torch.cat([torch.zeros(n), torch.ones(len(rows) - n)]).to(logits.device)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, domains)
        return loss, loss


def ramp(progress: float) -> float:
    """DANN's schedule ``2 / (1 + exp(-10 p)) - 1``: 0 at the start, near 1 from p = 0.5.

    The penalty then does not act on the random early features of a new head.
    """
    return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0


def constant(progress: float) -> float:
    """Return the full weight from the start."""
    return 1.0
