"""DomainAdaptedClassifier: fine-tuning with an MMD penalty towards unlabeled target images."""

from __future__ import annotations

from functools import partial
from numbers import Real
from typing import ClassVar

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted, column_or_1d

from ._augment import augment
from ._compat import Interval, StrOptions, fit_context
from ._labels import check_labels, unlabeled_rows
from ._network import LOGITS, PENULTIMATE, resolve_layer_names
from ._objectives import DivergencePenalty, Supervised, constant, ramp
from ._taps import parse_layers, verified_layouts
from .fine_tuning import FINE_TUNE_CONSTRAINTS, FineTuneClassifier
from .losses import KERNELS, linear_time_mmd, mmd

MMD_SCHEDULES = {"ramp": ramp, "constant": constant}


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
        ``"logits"`` (the output), or module names (and timm's ``"intermediate:N"``,
        as in :class:`~skdeep.FeatureExtractor`), pooled by average.
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

    _parameter_constraints: ClassVar[dict] = {
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
        augment=False,
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

    @fit_context
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
            The fitted classifier.
        """
        source = self._image_source(X)
        y = check_labels(y, len(source))
        unlabeled = unlabeled_rows(y)
        domains = self._check_domains(sample_domain, unlabeled, len(source), X_target)
        labeled_source = (domains >= 0) & ~unlabeled
        if not labeled_source.any():
            raise ValueError("no labeled source rows: every source row has y == -1")
        codes = self._encode_labels(y, labeled_source)  # target labels: for scoring only
        if X_target is not None:
            target = self._image_source(X_target, argument="X_target")
            target_rows = np.arange(len(target))
        else:
            target, target_rows = source, np.flatnonzero(domains < 0)
        if len(target_rows) < 2:
            raise ValueError(
                f"{type(self).__name__} needs at least two target images: mark them with "
                "y == -1 (or sample_domain < 0), or pass X_target"
            )
        n_source = int(labeled_source.sum())
        self._train(source, codes, partial(self._objective, target, target_rows, n_source))
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

    def _objective(self, target, target_rows, n_source, criterion, rng: np.random.Generator):
        """Make the MMD penalty objective (plain supervised training for ``mmd_weight=0``).

        The target side draws from its own random generators, seeded from ``rng``
        without consuming it, so that the source side draws exactly what
        FineTuneClassifier would: with ``mmd_weight=0`` the two train alike.
        """
        if self.mmd_weight == 0:
            return Supervised(criterion)
        layers = parse_layers(self.adapt_layers, "adapt_layers")
        layers = resolve_layer_names(self.model_, layers, argument="adapt_layers")
        was_training = self.model_.training
        _, layouts = verified_layouts(
            self.model_.eval(),
            layers,
            "avg",
            size=self.preprocessing_.crop_size,
            device=self.device_,
        )
        self.model_.train(was_training)
        target_rng = np.random.default_rng(rng.bit_generator.seed_seq.spawn(1)[0])
        generator = torch.Generator().manual_seed(int(target_rng.integers(2**31)))
        estimator = mmd if self.mmd_estimator == "unbiased" else linear_time_mmd
        return DivergencePenalty(
            criterion,
            partial(estimator, kernel=self.mmd_kernel, bandwidths=self.mmd_bandwidths),
            layers,
            layouts=layouts,
            weight=self.mmd_weight,
            schedule=MMD_SCHEDULES[self.mmd_schedule],
            target_batches=self._target_batches(target, target_rows, target_rng, generator),
            # As many target images as source images, in the same batches.
            calibration_target_batches=lambda: self._input_batches(
                target, np.resize(target_rows, n_source)
            ),
        )

    def _target_batches(self, target, rows, rng: np.random.Generator, generator):
        """Endless target batches of ``batch_size`` images, reshuffled after each pass."""
        augmentations = self._check_augment()
        while True:
            order = rng.permutation(rows)
            usable = len(order) - len(order) % self.batch_size
            order = order[:usable] if usable else order
            for images in self._input_batches(target, order):
                yield augment(images, augmentations, generator)

    # --- scoring --------------------------------------------------------------------------

    def score(self, X, y, sample_weight=None):
        """Accuracy on the labeled rows (``y != -1``); unlabeled rows are ignored.

        Parameters
        ----------
        X : images
            See :meth:`fit`.
        y : array-like of shape (n_images,)
            True labels; -1 (or "-1", None) marks rows that are not scored.
        sample_weight : array-like of shape (n_images,), optional
            Weights of the rows.

        Returns
        -------
        float
            The (weighted) share of labeled rows predicted right.
        """
        check_is_fitted(self)
        source = self._image_source(X)
        y = check_labels(y, len(source))
        labeled = np.flatnonzero(~unlabeled_rows(y))
        if not len(labeled):
            raise ValueError("score needs labeled rows; every row of y is -1")
        logits = self._outputs(source, LOGITS, labeled)
        correct = self.classes_[logits.argmax(axis=1)] == y[labeled]
        weights = None if sample_weight is None else np.asarray(sample_weight)[labeled]
        return float(np.average(correct, weights=weights))
