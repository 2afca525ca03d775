"""DomainAdaptedClassifier: fine-tuning that carries over to unlabeled target images."""

from __future__ import annotations

import inspect
import itertools
from functools import partial
from numbers import Real
from typing import ClassVar

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted

from ._augment import augment, parse_augment
from ._compat import Interval, StrOptions, fit_context
from ._labels import check_labels, check_sample_domain, unlabeled_rows
from ._layouts import pooled_names
from ._network import LOGITS, PENULTIMATE, resolve_layer_names
from ._objectives import (
    AdversarialPenalty,
    CheckedDivergence,
    DivergencePenalty,
    JointDivergencePenalty,
    Supervised,
    constant,
    domain_classifier,
    ramp,
)
from ._taps import parse_layers, verified_layouts
from .fine_tuning import FINE_TUNE_CONSTRAINTS, FineTuneClassifier
from .losses import KERNELS, coral, joint_mmd, linear_time_mmd, mmd

SCHEDULES = {"ramp": ramp, "constant": constant}
DIVERGENCES = ("mmd", "joint_mmd", "coral", "adversarial")


class DomainAdaptedClassifier(FineTuneClassifier):
    """Fine-tuning that carries over to an unlabeled target domain (DAN, JAN, Deep CORAL, DANN).

    Trains like :class:`FineTuneClassifier` on the labeled source images while a
    divergence pulls the features of source and target images together (and, with
    ``information_weight`` or ``class_confusion_weight``, the predictions on the
    target images are asked to be confident and diverse, or not to mix classes)::

        loss = cross_entropy(source) + ramp(progress) * (
            divergence_weight * sum over adapt_layers of
                divergence(source features, target features)
            + information_weight * information_loss(target predictions)
            + class_confusion_weight * class_confusion_loss(target predictions))

    Each step draws a source batch and a target batch of the same size. The
    divergence is a multi-kernel MMD by default (the Deep Adaptation Network's, with
    skada's 33 Laplacian kernels; a linear kernel gives Deep Domain Confusion), the
    MMD of features and labels together (class by class, with the target's
    predictions as labels), Deep CORAL's covariance distance, or DANN's domain
    classifier behind a gradient reversal layer. By default, Minimum Class Confusion
    (weight 0.3) also asks the target predictions not to mix classes. After training,
    batch norms take their statistics from the target images, which the network then
    predicts.

    Target images travel with the source images, row-aligned, so that pipelines and
    cross-validation keep them together: ``y == -1`` marks unlabeled (target) rows,
    and ``sample_domain`` (>= 0 source, < 0 target) is needed only for target rows
    that carry labels. Labels of target rows are never used for training; ``score``
    uses every labeled row and ignores unlabeled ones. To choose settings without
    target labels, see :mod:`skdeep.metrics`.

    Parameters
    ----------
    divergence : {"mmd", "joint_mmd", "coral", "adversarial"} or callable, default="mmd"
        How the domains are compared: "mmd" (see the ``mmd_*`` parameters and
        :func:`skdeep.losses.mmd`), "joint_mmd" (the MMD of features and labels
        together, :func:`skdeep.losses.joint_mmd`: the ``mmd_*`` kernel times a
        linear kernel on the source labels and the target images' predicted
        probabilities, detached, so that each class is aligned with itself),
        "coral" (:func:`skdeep.losses.coral`),
        "adversarial" (DANN: a domain classifier with two hidden layers of 1024
        units, trained with the network at ``lr``, behind a gradient reversal layer
        whose coefficient is the scheduled weight), or a callable
        ``divergence(source_rows, target_rows)`` returning a differentiable scalar
        (a tensor with one finite value; anything else stops ``fit`` with an error
        that names ``divergence``).
    divergence_weight : float, default=1.0
        Weight of the divergence. The divergences differ in scale, so a weight that
        suits the MMD need not suit the others; :mod:`skdeep.metrics` helps choose
        one without target labels. At 0 the prediction terms (class confusion, by
        default) adapt alone (the divergence is still measured, for the history); with
        ``class_confusion_weight=0`` and ``information_weight=0`` too, the classifier
        trains exactly like :class:`FineTuneClassifier` (the target images are used
        only to recalibrate batch norms).
    divergence_schedule : {"ramp", "constant"}, default="ramp"
        "ramp" grows the weight as ``2 / (1 + exp(-10 p)) - 1`` over training
        progress p (from 0 to 1), as DANN does, so that the divergence does not act
        on the random early features of the new head; "constant" applies it fully
        from the start.
    information_weight : float, default=0.0
        Weight of the information-maximization term on the target images'
        predictions (:func:`skdeep.losses.information_loss`): each prediction
        confident, the batch's predictions spread over the classes. Scheduled like the
        divergence; 0 (the default) leaves it out.
    class_confusion_weight : float, default=0.3
        Weight of Minimum Class Confusion on the target images' predictions
        (:func:`skdeep.losses.class_confusion_loss`, Jin et al., 2020): confident
        predictions count more, and the loss is the share of the batch's predicted
        mass that mixes two classes. Scheduled like the divergence; 0 leaves it out
        (the divergence alone).
    adapt_layers : str or tuple of str, default=("penultimate",)
        Features compared: ``"penultimate"`` (the head's input), ``"logits"`` (the
        output), or module names (and timm's ``"intermediate:N"``, as in
        :class:`~skdeep.FeatureExtractor`), pooled by average. DANN's domain
        classifier sees them concatenated.
    batch_norm : {"joint", "per_domain"}, default="joint"
        During training, run each source batch and its target batch through the
        network together ("joint": batch norms normalize both with their mixed
        statistics) or apart ("per_domain": each with its own statistics).
    recalibrate_bn : {"target", "both"} or bool, default="target"
        After training, recompute the statistics of the trained batch norms in one
        pass over the target images ("target", AdaBN: the network then predicts
        target images with their own statistics), over source and target batches
        together ("both", or True), or not at all (False).
    mmd_kernel : {"laplacian", "gaussian", "linear"}, default="laplacian"
        Kernel of the MMD (``divergence="mmd"`` or ``"joint_mmd"`` only; see
        :func:`skdeep.losses.mmd`).
    mmd_bandwidths : None, "median", float or list of floats, default=None
        Bandwidths; None is the multi-kernel family of the kernel: 33 Laplacian
        kernels around the median distance of the source rows, or DAN's five Gaussian
        ones around the median distance (``divergence="mmd"`` or ``"joint_mmd"`` only).
    mmd_estimator : {"biased", "unbiased", "linear_time"}, default="biased"
        The quadratic-time biased (V-statistic, as skada's DAN) or unbiased estimate,
        or the linear-time one (less memory for large batches, more variance;
        ``divergence="mmd"`` only; ``"joint_mmd"`` takes the first two).
    augment : bool or str, default="crop"
        As in :class:`FineTuneClassifier`, applied to source and target batches
        alike. Random crops are on by default here: they shift the framing of both
        domains, which much of a shift between image sets often is. Flips (wrong for
        digits and text) and rotations are off by default.
    **fine_tune_params
        Everything else :class:`FineTuneClassifier` takes (backbone, weights,
        image_size, max_epochs, batch_size, lr, freeze, ...), with the same meaning.
        ``early_stopping`` holds out labeled source rows.

    Attributes
    ----------
    classes_, model_, history_, n_epochs_, best_epoch_, head_name_, frozen_modules_
        As in :class:`FineTuneClassifier`. Each ``history_`` record also holds the
        epoch's mean divergence (before weighting) under the divergence's name
        (``"mmd"``, ``"joint_mmd"``, ``"coral"``; ``"adversarial"``: the domain classifier's
        cross-entropy, ln 2 = 0.69 when it cannot tell the domains apart;
        ``"divergence"`` for a callable), and those of the prediction terms in use
        (``"information"``, ``"class_confusion"``).

    Notes
    -----
    Without target labels, nothing ties each target class to its source class but
    the features, so a run can match some of them wrongly, and which runs do depends
    on ``random_state`` and, through float rounding, on the CPU: the same seed gives
    the same model on one kind of CPU, not necessarily on another.

    What to expect from one run, measured with these defaults on MNIST 5k -> optdigits
    (mobilenet_v2 ImageNet at 32 px; mean ± standard deviation, and the lowest seed):
    94.4 ± 1.4 % over 31 seeds on an AMD EPYC with AVX512-BF16 (lowest 90.4), 94.9 ±
    1.0 % over 8 seeds on the same CPU with its oneDNN kernels capped at AVX2 (lowest
    93.4). Trained 4 epochs instead of 10, runs score lower and can fail: 93.2 ± 1.0 %
    (lowest 92.4) and 91.7 ± 2.1 % (lowest 89.1) on those kinds over 8 seeds; 91.5 ±
    3.0 % over 16 seeds (lowest 84.3) on an Intel Xeon with AMX (fits of version 0.2.0,
    whose batches differ); over 64 seeds of version 0.2.0 on the AMD EPYC, 91.4 ± 2.9 %
    with 4 seeds below 86 % (lowest 82.2). Source-only fine-tuning reaches 23 to 29 %
    on these kinds.
    Few optimizer steps make runs less stable: with 2,000 source images at
    ``batch_size=64`` (32 steps an epoch), 4 epochs gave 82.4 ± 6.4 % (lowest 69.1) on
    the AMD EPYC and 82.3 ± 9.1 % (lowest 60.4) with AVX2 kernels, the default 10
    epochs 92.9 ± 1.5 % (lowest 90.3) and 92.5 ± 2.0 % (lowest 89.9). With few source
    images, raise ``max_epochs`` so that training takes a few hundred steps.
    The benchmark pages of the documentation hold the tables.

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
        "divergence": [StrOptions(set(DIVERGENCES)), callable],
        "divergence_weight": [Interval(Real, 0, None, closed="left")],
        "divergence_schedule": [StrOptions(set(SCHEDULES))],
        "information_weight": [Interval(Real, 0, None, closed="left")],
        "class_confusion_weight": [Interval(Real, 0, None, closed="left")],
        "adapt_layers": [str, list, tuple],
        "batch_norm": [StrOptions({"joint", "per_domain"})],
        "recalibrate_bn": ["boolean", StrOptions({"target", "both"})],
        "mmd_kernel": [StrOptions(set(KERNELS))],
        "mmd_bandwidths": [
            None,
            StrOptions({"median"}),
            Interval(Real, 0, None, closed="neither"),
            list,
            tuple,
        ],
        "mmd_estimator": [StrOptions({"biased", "unbiased", "linear_time"})],
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
        augment="crop",
        label_smoothing=0.0,
        class_weight=None,
        early_stopping=False,
        validation_fraction=0.1,
        n_iter_no_change=3,
        tol=1e-4,
        recalibrate_bn="target",
        divergence="mmd",
        divergence_weight=1.0,
        divergence_schedule="ramp",
        information_weight=0.0,
        class_confusion_weight=0.3,
        adapt_layers=(PENULTIMATE,),
        batch_norm="joint",
        mmd_kernel="laplacian",
        mmd_bandwidths=None,
        mmd_estimator="biased",
        random_state=None,
        device="auto",
        precision="auto",
        num_workers=0,
        verbose=False,
        warm_start=False,
        devices=None,
        sync_batch_norm=False,
        collective_timeout=300.0,
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
            devices=devices,
            sync_batch_norm=sync_batch_norm,
            collective_timeout=collective_timeout,
        )
        self.divergence = divergence
        self.divergence_weight = divergence_weight
        self.divergence_schedule = divergence_schedule
        self.information_weight = information_weight
        self.class_confusion_weight = class_confusion_weight
        self.adapt_layers = adapt_layers
        self.batch_norm = batch_norm
        self.mmd_kernel = mmd_kernel
        self.mmd_bandwidths = mmd_bandwidths
        self.mmd_estimator = mmd_estimator

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
            Class labels, as any array scikit-learn takes (integers, floats, strings,
            objects, a pandas Series). Unlabeled (target) rows hold -1, the string
            "-1", or a missing value (None, NaN, ``pd.NA``), whatever the dtype;
            scikit-learn's stratified splitters need one type, so -1 among integers
            and "-1" among strings are the markers that cross-validate.
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
        self._begin_fit()  # until this fit ends, the estimator is not fitted
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
        processes = self._processes_to_spawn()
        if processes is not None:
            arguments = dict(X=X, y=y, sample_domain=sample_domain, X_target=X_target)
            return self._fit_in_processes(processes, codes, **arguments)
        objective = partial(self._objective, target, target_rows)
        self._train(source, codes, objective, targets=(target, target_rows))
        return self

    def _separate_domain_passes(self) -> bool:
        return self.batch_norm == "per_domain"

    def _check_domains(self, sample_domain, unlabeled, n_images, X_target) -> np.ndarray:
        if sample_domain is None:
            return np.where(unlabeled & (X_target is None), -1, 0)
        if X_target is not None:
            raise ValueError(
                "pass either sample_domain (row-aligned targets) or X_target, not both"
            )
        domains = check_sample_domain(sample_domain, n_images)
        unlabeled_source = np.flatnonzero((domains >= 0) & unlabeled)
        if len(unlabeled_source):
            raise ValueError(
                "source rows (sample_domain >= 0) must be labeled; rows "
                f"{unlabeled_source[:5].tolist()} have y == -1"
            )
        return domains

    def _objective(self, target, target_rows, criterion, rng: np.random.Generator, plan):
        """Make the training objective of ``divergence`` (supervised when every weight is 0).

        The target side draws from its own random generators, seeded from ``rng``
        without consuming it, so that the source side draws exactly what
        FineTuneClassifier would: with every weight at 0 the two train alike. Which
        target rows each step takes is the data ``plan``'s decision.
        """
        calibration = self._calibration_target(target, target_rows, plan)
        calibrate_on = "target" if self.recalibrate_bn == "target" else "both"
        weights = (self.divergence_weight, self.information_weight, self.class_confusion_weight)
        if not any(weights):
            return Supervised(criterion, calibration, calibrate_on)
        layers = parse_layers(self.adapt_layers, "adapt_layers")
        layers = resolve_layer_names(self.model_, layers, argument="adapt_layers")
        was_training = self.model_.training
        probe, layouts = verified_layouts(
            self.model_.eval(),
            layers,
            "avg",
            size=self.preprocessing_.crop_size,
            device=self.device_,
        )
        self.model_.train(was_training)
        target_rng = np.random.default_rng(rng.bit_generator.seed_seq.spawn(1)[0])
        generator = torch.Generator().manual_seed(int(target_rng.integers(2**31)))
        options = dict(
            layouts=layouts,
            separate_passes=self.batch_norm == "per_domain",
            calibration_target_batches=calibration,
            calibrate_on=calibrate_on,
            information_weight=self.information_weight,
            class_confusion_weight=self.class_confusion_weight,
        )
        schedule = SCHEDULES[self.divergence_schedule]
        batches = self._target_batches(target, target_rows, plan, generator)
        if self.divergence == "adversarial":
            width = sum(
                len(pooled_names(layer, tuple(probe.outputs[layer].shape), layouts[layer], "avg"))
                for layer in layers
            )
            classifier = domain_classifier(width).to(self.device_)
            return AdversarialPenalty(
                criterion, classifier, layers, self.divergence_weight, schedule, batches, **options
            )
        penalty = JointDivergencePenalty if self.divergence == "joint_mmd" else DivergencePenalty
        return penalty(
            criterion,
            self._divergence_function(),
            layers,
            self.divergence_weight,
            schedule,
            batches,
            name=self.divergence if isinstance(self.divergence, str) else "divergence",
            **options,
        )

    def _divergence_function(self):
        """Return the divergence between pooled source and target rows that ``divergence`` names."""
        options = dict(kernel=self.mmd_kernel, bandwidths=self.mmd_bandwidths)
        if self.divergence == "joint_mmd":
            if self.mmd_estimator == "linear_time":
                raise ValueError(
                    "mmd_estimator='linear_time' applies to divergence='mmd' only; "
                    "divergence='joint_mmd' takes 'biased' or 'unbiased'"
                )
            return partial(joint_mmd, unbiased=self.mmd_estimator == "unbiased", **options)
        if self.divergence != "mmd":
            # The defaults from the signature, so that they are written down once.
            defaults = inspect.signature(type(self)).parameters
            changed = [
                key
                for key in ("mmd_kernel", "mmd_bandwidths", "mmd_estimator")
                if getattr(self, key) != defaults[key].default
            ]
            if changed:
                raise ValueError(
                    f"{changed[0]}={getattr(self, changed[0])!r} applies to divergence='mmd' "
                    f"or 'joint_mmd' only; got divergence={self.divergence!r}"
                )
            return coral if self.divergence == "coral" else CheckedDivergence(self.divergence)
        if self.mmd_estimator == "linear_time":
            return partial(linear_time_mmd, **options)
        return partial(mmd, unbiased=self.mmd_estimator == "unbiased", **options)

    def _calibration_target(self, target, target_rows, plan):
        """Unaugmented target batches for the recalibration pass (None: source only).

        As many target images as source images, in batches like theirs, so that "both"
        mixes the domains in the same proportion as training.
        """
        if self.recalibrate_bn not in ("target", "both", True):
            return None
        return lambda: self._step_images(
            target, target_rows, plan.target_in_order(len(target_rows))
        )

    def _target_batches(self, target, rows, plan, generator):
        """Endless augmented target batches, each the size of its step's source batch.

        In data-parallel training, this process's part of each (see the data plan).
        """
        augmentations = parse_augment(self.augment)
        for epoch in itertools.count(1):
            steps = plan.target_epoch(epoch, len(rows))
            for step, images in zip(steps, self._step_images(target, rows, steps), strict=True):
                yield augment(images, augmentations, generator, step.share, step.global_size)

    # --- scoring --------------------------------------------------------------------------

    def score(self, X, y, sample_weight=None):
        """Accuracy on the labeled rows (``y != -1``); unlabeled rows are ignored.

        Parameters
        ----------
        X : images
            See :meth:`fit`.
        y : array-like of shape (n_images,)
            True labels; unlabeled rows (-1, "-1" or missing, as in :meth:`fit`) are
            not scored.
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
            raise ValueError(
                "score needs labeled rows; every row of y is unlabeled (-1, '-1' or missing)"
            )
        logits = self._outputs(source, LOGITS, labeled)
        correct = self.classes_[logits.argmax(axis=1)] == y[labeled]
        weights = None
        if sample_weight is not None:
            weights = np.asarray(sample_weight, dtype=float)
            if weights.shape != (len(y),):
                raise ValueError(
                    f"sample_weight must hold one weight per image, shape ({len(y)},); got "
                    f"an array of shape {weights.shape}"
                )
            weights = weights[labeled]
        return float(np.average(correct, weights=weights))
