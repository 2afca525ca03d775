"""DomainAdaptedClassifier: fine-tuning with an MMD penalty towards unlabeled target images."""

from __future__ import annotations

import contextlib
import math
from numbers import Real

import numpy as np
import torch
from sklearn.base import _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, column_or_1d

from ._augment import augment
from ._taps import LayerTaps, pool
from ._training import StepResult
from .backbones import PENULTIMATE, check_layer_names
from .fine_tuning import FINE_TUNE_CONSTRAINTS, FineTuneClassifier
from .losses import KERNELS, linear_time_mmd, mmd

LOGITS = "logits"
"""Adapt-layer name of the network's output (DAN adapts it as well)."""


class DomainAdaptedClassifier(FineTuneClassifier):
    """Fine-tuning that carries over to an unlabeled target domain (DDC / DAN).

    Trains like :class:`FineTuneClassifier` on the labeled source images while an MMD
    penalty pulls the features of source and target images together::

        loss = cross_entropy(source) + mmd_weight * ramp(progress) * sum of
               MMD(source features, target features) over adapt_layers

    Each step draws a source batch and a target batch of the same size and runs them
    through the network together. With ``adapt_layers=("penultimate",)`` and a linear
    kernel this is Deep Domain Confusion; the default Gaussian multi-kernel on the
    penultimate features and the logits is the Deep Adaptation Network.

    Target images travel with the source images, row-aligned, so that pipelines and
    cross-validation keep them together: ``y == -1`` marks unlabeled (target) rows,
    and ``sample_domain`` (>= 0 source, < 0 target) is needed only for target rows
    that carry labels. Labels of target rows are never used for training; ``score``
    uses every labeled row and ignores unlabeled ones.

    Parameters
    ----------
    mmd_weight : float, default=1.0
        Weight of the MMD penalty. 0 trains exactly like :class:`FineTuneClassifier`
        (the target images are not used).
    mmd_kernel : {"gaussian", "linear"}, default="gaussian"
        Kernel of the MMD (see :func:`skdeep.losses.mmd`).
    mmd_bandwidths : None, "median", float or list of floats, default=None
        Gaussian bandwidths; None is DAN's five kernels around the median distance.
    mmd_estimator : {"unbiased", "linear_time"}, default="unbiased"
        The quadratic-time unbiased estimate, or the linear-time one (less memory
        for large batches, more variance).
    adapt_layers : tuple of str, default=("penultimate", "logits")
        Features the penalty applies to: ``"penultimate"`` (the head's input),
        ``"logits"`` (the output), or module names (pooled by average).
    mmd_schedule : {"ramp", "constant"}, default="ramp"
        "ramp" grows the weight as ``2 / (1 + exp(-10 p)) - 1`` over training
        progress p (from 0 to 1), so that the penalty does not act on the random
        early features of the new head; "constant" applies it fully from the start.
    **fine_tune_params
        Everything :class:`FineTuneClassifier` takes (backbone, weights, image_size,
        max_epochs, batch_size, lr, freeze, augment, ...), with the same meaning.
        ``early_stopping`` holds out labeled source rows.

    Attributes
    ----------
    classes_, model_, history_, n_epochs_, best_epoch_, head_name_, frozen_modules_
        As in :class:`FineTuneClassifier`. Each ``history_`` record also holds
        ``mmd``: the mean penalty (before weighting) over the epoch.

    Examples
    --------
    >>> import numpy as np
    >>> from skdeep import DomainAdaptedClassifier
    >>> rng = np.random.default_rng(0)
    >>> source = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    >>> target = rng.integers(0, 128, (16, 24, 24, 3), dtype=np.uint8)
    >>> clf = DomainAdaptedClassifier("resnet18", weights=None, image_size=32, max_epochs=1,
    ...                               batch_size=8, random_state=0)
    >>> clf = clf.fit(source, np.array([0, 1] * 8), X_target=target)
    >>> clf.predict(target).shape
    (16,)
    """

    _parameter_constraints = {
        **FINE_TUNE_CONSTRAINTS,
        "mmd_weight": [Interval(Real, 0, None, closed="left")],
        "mmd_kernel": [StrOptions(set(KERNELS))],
        "mmd_bandwidths": [
            None,
            StrOptions({"median"}),
            Interval(Real, 0, None, closed="neither"),
            list,
            tuple,
        ],
        "mmd_estimator": [StrOptions({"unbiased", "linear_time"})],
        "adapt_layers": [str, list, tuple],
        "mmd_schedule": [StrOptions({"ramp", "constant"})],
    }

    def __init__(
        self,
        backbone="mobilenet_v2",
        weights="IMAGENET1K_V1",
        image_size=None,
        image_shape=None,
        value_range=None,
        max_epochs=10,
        batch_size=32,
        lr=1e-3,
        backbone_lr=None,
        optimizer="adamw",
        weight_decay=1e-4,
        scheduler="cosine",
        freeze=None,
        augment=True,
        label_smoothing=0.0,
        class_weight=None,
        early_stopping=False,
        validation_fraction=0.1,
        n_iter_no_change=3,
        tol=1e-4,
        recalibrate_bn=True,
        mmd_weight=1.0,
        mmd_kernel="gaussian",
        mmd_bandwidths=None,
        mmd_estimator="unbiased",
        adapt_layers=(PENULTIMATE, LOGITS),
        mmd_schedule="ramp",
        random_state=None,
        device="auto",
        precision="auto",
        num_workers=0,
        verbose=False,
        warm_start=False,
    ):
        super().__init__(
            backbone=backbone,
            weights=weights,
            image_size=image_size,
            image_shape=image_shape,
            value_range=value_range,
            max_epochs=max_epochs,
            batch_size=batch_size,
            lr=lr,
            backbone_lr=backbone_lr,
            optimizer=optimizer,
            weight_decay=weight_decay,
            scheduler=scheduler,
            freeze=freeze,
            augment=augment,
            label_smoothing=label_smoothing,
            class_weight=class_weight,
            early_stopping=early_stopping,
            validation_fraction=validation_fraction,
            n_iter_no_change=n_iter_no_change,
            tol=tol,
            recalibrate_bn=recalibrate_bn,
            random_state=random_state,
            device=device,
            precision=precision,
            num_workers=num_workers,
            verbose=verbose,
            warm_start=warm_start,
        )
        self.mmd_weight = mmd_weight
        self.mmd_kernel = mmd_kernel
        self.mmd_bandwidths = mmd_bandwidths
        self.mmd_estimator = mmd_estimator
        self.adapt_layers = adapt_layers
        self.mmd_schedule = mmd_schedule

    # --- fitting --------------------------------------------------------------------------

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_domain=None, X_target=None):
        """Fine-tune on the labeled source rows while adapting to the target rows.

        Parameters
        ----------
        X : images
            Source and target images, row-aligned with ``y`` (any form
            :class:`~skdeep.FeatureExtractor` accepts; a list for mixed sizes).
        y : array-like of shape (n_images,)
            Class labels; -1 marks unlabeled (target) rows. With string labels, the
            string "-1" does (None in an object array works too, but not in
            scikit-learn's cross-validation splitters, which need one type).
        sample_domain : array-like of int, optional
            Domain of each row: >= 0 source, < 0 target. Needed only when target rows
            carry labels (for scoring); without it, unlabeled rows are the target.
        X_target : images, optional
            Convenience for direct calls: unlabeled target images, given apart from
            the source images ``X`` (then every row of ``X`` is a source row). They
            may differ in size from ``X``. Cross-validation needs the row-aligned form.

        Returns
        -------
        self : DomainAdaptedClassifier
        """
        source = self._image_source(X)
        unlabeled = _unlabeled_rows(y, len(source))
        domains = self._check_domains(sample_domain, unlabeled, len(source), X_target)
        if not ((domains >= 0) & ~unlabeled).any():
            raise ValueError("no labeled source rows: every source row has y == -1")
        codes = self._encode_labels(y, len(source), unlabeled=unlabeled | (domains < 0))
        target_rows = np.flatnonzero(domains < 0)  # their labels are for scoring only
        if X_target is not None:
            target = self._image_source(X_target)
            target_rows = np.arange(len(target))
        else:
            target = source
        if len(target_rows) < 2:
            raise ValueError(
                f"{type(self).__name__} needs at least two target images: mark them with "
                "y == -1 (or sample_domain < 0), or pass X_target"
            )
        self._target = (target, target_rows)
        try:
            self._train(source, codes)
        finally:
            del self._target  # fitted estimators keep no reference to the data
        return self

    def _check_domains(self, sample_domain, unlabeled, n_images, X_target) -> np.ndarray:
        if sample_domain is None:
            return np.where(unlabeled & (X_target is None), -1, 0)
        if X_target is not None:
            raise ValueError(
                "pass either sample_domain (row-aligned targets) or X_target, not both"
            )
        domains = column_or_1d(sample_domain)
        if len(domains) != n_images:
            raise ValueError(
                f"sample_domain has {len(domains)} entries but X has {n_images} images"
            )
        if domains.dtype.kind not in "iu":
            raise ValueError(f"sample_domain must hold integers; got dtype {domains.dtype}")
        unlabeled_source = np.flatnonzero((domains >= 0) & unlabeled)
        if len(unlabeled_source):
            raise ValueError(
                "source rows (sample_domain >= 0) must be labeled; rows "
                f"{unlabeled_source[:5].tolist()} have y == -1"
            )
        return domains

    def _adapt_layers(self) -> list[str]:
        layers = (
            [self.adapt_layers] if isinstance(self.adapt_layers, str) else list(self.adapt_layers)
        )
        if not layers or len(set(layers)) < len(layers):
            raise ValueError(
                f"adapt_layers must list distinct layer names; got {self.adapt_layers!r}"
            )
        return layers

    @contextlib.contextmanager
    def _training_context(self, model, rng: np.random.Generator):
        """Tap the adapted layers and open the stream of target batches.

        The target side draws from its own random generators, seeded from ``rng``
        without consuming it, so that the source side draws exactly what
        FineTuneClassifier would: with ``mmd_weight=0`` the two train alike.
        """
        layers = self._adapt_layers()
        tapped = [layer for layer in layers if layer != LOGITS]
        check_layer_names(model, tapped, argument="adapt_layers")
        target_rng = np.random.default_rng(rng.bit_generator.seed_seq.spawn(1)[0])
        generator = torch.Generator().manual_seed(int(target_rng.integers(2**31)))
        self._target_stream = self._target_batches(target_rng, generator)
        with LayerTaps(model, tapped) as taps:
            self._adapt_taps = taps
            try:
                yield
            finally:
                del self._adapt_taps, self._target_stream

    def _adapting(self) -> bool:
        return self.mmd_weight > 0

    def _target_batches(self, rng: np.random.Generator, generator: torch.Generator):
        """Endless target batches of ``batch_size`` images, reshuffled after each pass."""
        target, rows = self._target
        while True:
            order = rng.permutation(rows)
            usable = len(order) - len(order) % self.batch_size
            order = order[:usable] if usable else order
            for images in self._input_batches(target, order):
                yield augment(images, self._augmentations, generator)

    def _epoch_batches(self, source, codes, rows, rng, generator):
        source_batches = super()._epoch_batches(source, codes, rows, rng, generator)
        if not self._adapting():
            yield from source_batches
            return
        for images, labels in source_batches:
            target_images = next(self._target_stream)[: len(images)]
            yield images, labels, target_images

    def _step(self, model, batch, loss_function, progress: float) -> StepResult:
        if len(batch) == 2:
            return super()._step(model, batch, loss_function, progress)
        images, labels, target_images = batch
        n = len(images)
        logits = model(torch.cat([images, target_images]))
        outputs = dict(self._adapt_taps.outputs)
        outputs[LOGITS] = logits
        penalty = sum(
            self._mmd(pool(outputs[layer], "avg").float(), n) for layer in self._adapt_layers()
        )
        weight = self.mmd_weight * self._schedule(progress)
        source_logits = logits[:n].float()
        loss = loss_function(source_logits, labels) + weight * penalty
        correct = (source_logits.argmax(1) == labels).sum()
        return StepResult(loss, correct, n, metrics={"mmd": penalty})

    def _mmd(self, features: torch.Tensor, n_source: int) -> torch.Tensor:
        estimator = mmd if self.mmd_estimator == "unbiased" else linear_time_mmd
        bandwidths = self.mmd_bandwidths
        return estimator(features[:n_source], features[n_source:], self.mmd_kernel, bandwidths)

    def _schedule(self, progress: float) -> float:
        if self.mmd_schedule == "constant":
            return 1.0
        return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0

    def _calibration_batches(self, source, codes, rows):
        batches = super()._calibration_batches(source, codes, rows)
        if not self._adapting():
            yield from batches
            return
        # The same mix of domains as in training: each source batch with a target batch.
        target, target_rows = self._target
        target_batches = self._input_batches(target, np.resize(target_rows, len(rows)))
        for images, target_images in zip(batches, target_batches, strict=True):
            yield torch.cat([images, target_images])

    # --- scoring --------------------------------------------------------------------------

    def score(self, X, y, sample_weight=None):
        """Accuracy on the labeled rows (``y != -1``); unlabeled rows are ignored.

        Parameters
        ----------
        X : images
        y : array-like of shape (n_images,)
        sample_weight : array-like of shape (n_images,), optional

        Returns
        -------
        float
        """
        check_is_fitted(self)
        source = self._image_source(X)
        labeled = np.flatnonzero(~_unlabeled_rows(y, len(source)))
        if not len(labeled):
            raise ValueError("score needs labeled rows; every row of y is -1")
        logits = self._collect(source, self._logits_of, len(self.classes_), labeled)
        correct = self.classes_[logits.argmax(axis=1)] == np.asarray(y)[labeled]
        weights = None if sample_weight is None else np.asarray(sample_weight)[labeled]
        return float(np.average(correct, weights=weights))


def _unlabeled_rows(y, n_images: int) -> np.ndarray:
    """Boolean mask of the rows marked unlabeled: -1, or None / "-1" among strings."""
    y = np.asarray(y)
    if y.ndim != 1:
        y = column_or_1d(y, warn=True)
    if len(y) != n_images:
        raise ValueError(f"y has {len(y)} labels but X has {n_images} images")
    if y.dtype.kind in "iuf":
        return y == -1
    if y.dtype.kind in "US":
        return y.astype(str) == "-1"
    return np.array(
        [
            value is None or (isinstance(value, (int, float, np.number)) and value == -1)
            for value in y
        ]
    )
