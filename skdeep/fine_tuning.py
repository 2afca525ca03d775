"""FineTuneClassifier: fine-tune a pretrained CNN on the user's images inside ``fit``."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterator
from numbers import Integral, Real
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import train_test_split
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.validation import check_is_fitted
from torch import nn

from . import _distributed
from ._augment import augment, parse_augment
from ._base import BACKBONE_CONSTRAINTS, BackboneMixin
from ._compat import Interval, StrOptions, fit_context
from ._data_plan import (
    MIN_PART_WITH_BATCH_NORM,
    DataPlan,
    agree_seed,
    evaluation_rows,
    rank_seed,
    regroup,
)
from ._device import PRECISIONS, fork_rng, resolve_device
from ._inference import optimize_for_inference
from ._labels import check_labels, encode_labels
from ._layouts import ROWS, Layout, pooled_names
from ._network import (
    LOGITS,
    PENULTIMATE,
    backbone_stages,
    check_input_size,
    check_layer_names,
    drop_auxiliary_heads,
    head_names,
    holds_head,
    replace_head,
    single_values_per_channel,
)
from ._objectives import Supervised
from ._taps import check_timm_forward
from ._timm import has_timm_head
from ._training import (
    Trainer,
    make_optimizer,
    make_scheduler,
    recalibrate_batch_norm,
    training_batch_norms,
)
from .backbones import load_backbone

# The parameters that build the network and its preprocessing, which a warm start keeps.
NETWORK_PARAMETERS = ("backbone", "weights", "image_size")
FINE_TUNE_CONSTRAINTS = {
    **BACKBONE_CONSTRAINTS,
    "precision": [StrOptions(set(PRECISIONS) - {"int8"})],  # int8 does not train
    "max_epochs": [Interval(Integral, 1, None, closed="left")],
    "lr": [Interval(Real, 0, None, closed="neither")],
    "backbone_lr": [Interval(Real, 0, None, closed="left"), None],
    "optimizer": [StrOptions({"adamw", "sgd"})],
    "weight_decay": [Interval(Real, 0, None, closed="left")],
    "scheduler": [StrOptions({"cosine"}), None],
    "freeze": [
        None,
        StrOptions({"backbone"}),
        Interval(Integral, 0, None, closed="left"),
        list,
        tuple,
    ],
    "augment": ["boolean", str, None],  # the kinds are checked by parse_augment
    "label_smoothing": [Interval(Real, 0, 1, closed="left")],
    "class_weight": [None, StrOptions({"balanced"}), dict],
    "early_stopping": ["boolean"],
    "validation_fraction": [Interval(Real, 0, 1, closed="neither")],
    "n_iter_no_change": [Interval(Integral, 1, None, closed="left")],
    "tol": [Interval(Real, 0, None, closed="left")],
    "recalibrate_bn": ["boolean"],
    "warm_start": ["boolean"],
    "devices": [None, Interval(Integral, 1, None, closed="left"), list, tuple],
    "sync_batch_norm": ["boolean"],
    "collective_timeout": [Interval(Real, 0, None, closed="neither")],
}


class FineTuneClassifier(BackboneMixin, ClassifierMixin, BaseEstimator):
    """A pretrained CNN with a new head, fine-tuned on ``(X, y)`` in ``fit``.

    The classifier head of the backbone is replaced by a fresh one with one output per
    class; then the network (or part of it, see ``freeze``) is trained with
    cross-entropy, discriminative learning rates, a warm-up + cosine schedule, batched
    augmentation and optional early stopping.

    Parameters
    ----------
    backbone : str or torch.nn.Module, default="mobilenet_v2"
        A torchvision classification model name, ``"timm:<name>[.<tag>]"`` for a timm
        model (its head is replaced with timm's ``reset_classifier``), or a module
        (deep-copied, never changed). The auxiliary classifiers of Inception v3 and
        GoogLeNet are removed: the new head trains alone.
    weights : str, path or None, default="IMAGENET1K_V1"
        Pretrained weights to start from: a torchvision weights name (for timm models,
        ``"DEFAULT"`` or ``"IMAGENET1K_V1"``: the tag's pretrained weights), a
        ``state_dict`` file, or None for random initialisation (see
        :class:`~skdeep.FeatureExtractor`).
    image_size : int or None, default=None
        Network input size; None follows the weights' preprocessing (224 for
        ImageNet weights). Smaller sizes train much faster on small images.
    image_shape : tuple or None, default=None
        ``(H, W)`` or ``(H, W, C)`` when ``X`` holds flat rows.
    value_range : (float, float) or None, default=None
        Pixel values meaning black and white; None: (0, 255) for integers, (0, 1)
        for floats.
    max_epochs : int, default=10
        Passes over the training images.
    batch_size : int, default=32
        Images per optimizer step (and per inference batch). Every image trains once
        per epoch. Where a trained batch norm sees a single value per channel of an
        image (after global pooling, or at 1x1 maps for small inputs), it cannot train
        on one image: a final batch of one image then joins the batch before it, and
        ``fit`` refuses ``batch_size=1`` or a single training image.
    lr : float, default=1e-3
        Learning rate of the new head.
    backbone_lr : float or None, default=None
        Learning rate of the pretrained layers (discriminative learning rates);
        None means ``lr``. A smaller value, such as ``lr / 10``, keeps the features
        closer to the pretrained ones, which can help when the images resemble
        ImageNet; for other domains (digits, say) the full rate trains better.
    optimizer : {"adamw", "sgd"}, default="adamw"
        AdamW, or SGD with Nesterov momentum 0.9.
    weight_decay : float, default=1e-4
        Decoupled (AdamW) or L2 (SGD) weight decay; biases and normalization
        weights are not decayed.
    scheduler : {"cosine"} or None, default="cosine"
        Per-step learning rate: linear warm-up over the first 5% of steps, then
        cosine decay to zero. None keeps the rates constant.
    freeze : None, "backbone", int or list of str, default=None
        What is not trained: None trains everything; "backbone" trains only the
        head; an int N freezes the first N blocks listed by
        :func:`skdeep.backbones.backbone_stages`; a list names modules to freeze.
        Frozen modules also keep their batch-norm statistics.
    augment : bool or str, default=False
        Random crops ("crop": 80-100% of each side, resized back), rotations
        ("rotate": up to 15 degrees either way) and/or horizontal flips ("flip"),
        joined by "+" ("crop+rotate", "crop+flip", ...), applied on the device to
        whole batches; True means "crop+flip", False or None none. Off by default
        because which changes keep a label depends on the images: flips are wrong
        for digits, text and many medical or industrial images, and over a few
        epochs augmentation slows learning. "crop" suits photos trained for more
        epochs.
    label_smoothing : float, default=0.0
        Label smoothing of the cross-entropy loss.
    class_weight : dict, "balanced" or None, default=None
        Weights of the classes in the loss, as in scikit-learn.
    early_stopping : bool, default=False
        Hold out ``validation_fraction`` of the training images (stratified), stop
        when the validation loss has not improved by ``tol`` for
        ``n_iter_no_change`` epochs, and keep the weights of the best epoch.
    validation_fraction : float, default=0.1
        Share of the training images held out when ``early_stopping`` is on.
    n_iter_no_change : int, default=3
        Epochs without improvement before stopping.
    tol : float, default=1e-4
        Smallest decrease of the validation loss that counts as improvement.
    recalibrate_bn : bool, default=True
        After training, recompute the statistics of the trained batch norms with one
        forward pass over the training images. After few optimizer steps the running
        averages lag behind the weights and predictions suffer; the pass costs about
        a third of an epoch. Skipped when training is interrupted.
    batch_size, device, precision, num_workers
        As in :class:`~skdeep.FeatureExtractor`. ``precision="auto"`` trains with
        float16 autocast and a gradient scaler on CUDA; on CPUs that compute
        bfloat16 natively, with bfloat16 autocast from the input size where it trains
        faster on that kind of CPU (128 px with AMX, 64 px with AVX512-BF16 alone;
        smaller inputs train as fast or faster in float32 there); float32 elsewhere.
        Training in bfloat16 on a CPU keeps depthwise convolutions over small maps
        (14x14 or less) or with a stride in float32 (their bfloat16 backward is slow
        there). The fitted network predicts in the precision it was trained in.
    random_state : int, RandomState or None, default=None
        Seeds the head initialisation, shuffling, validation split, dropout and
        augmentation: the same seed on the CPU gives the same model.
    verbose : bool or int, default=False
        A progress bar per epoch with the running loss, and a line per epoch.
    warm_start : bool, default=False
        Continue training the fitted network on the next ``fit`` instead of
        starting again from the pretrained weights. The network and its preprocessing
        stay those of the first fit: a warm start after ``backbone``, ``weights`` or
        ``image_size`` changed is refused.
    devices : None, int or list of int, default=None
        Data-parallel training on ``torch.distributed``: None or 1 trains in this
        process; an int ``n`` trains with ``n`` processes, one per GPU on CUDA (NCCL)
        or ``n`` CPU processes (gloo) sharing the cores; a list of CUDA device indices
        picks the GPUs. ``fit`` starts the processes itself (the calling script needs
        ``if __name__ == "__main__":``), or, under ``torchrun``, joins the process
        group torchrun made (then ``devices`` must equal its number of processes, and
        every process must pass ``fit`` the same whole data, which the processes share
        out themselves: a process given other data is refused). ``batch_size`` stays
        the global batch, a multiple of the number of processes: each process takes an
        equal part of every batch, and DistributedDataParallel averages the
        gradients. Every training image is trained once per epoch: an epoch's last
        batch is padded to split evenly by repeating fewer images than there are
        processes, and one whose parts would hold a single image joins the batch
        before it when a trained batch norm would see a single value per channel of
        it (after global pooling); ``fit`` refuses, before any process starts, a
        ``batch_size`` or a number of images that cannot give every process two such
        images. All processes agree on one seed, rank 0's when ``random_state`` is
        None: they shuffle, split and initialise alike, while each draws its own
        dropout. Arrays are shared with the processes through a memory-mapped file;
        image files are decoded by each process for its part. Ctrl-C ends training
        as in one process: every process stops at the same step, and ``fit`` returns
        the best weights so far. The processes end with ``fit``; when the calling
        process is killed, they remove the shared copy of the data and exit (when
        every process is killed at once, the next data-parallel ``fit`` removes it).
        The fitted estimator is an ordinary one, which predicts in one process.
    sync_batch_norm : bool, default=False
        With ``devices``, whether batch norms normalize each batch with the statistics
        of the global batch (two collectives per batch norm and step: epochs three
        times slower than unsynchronized with gloo between two CPU processes, see
        ``benchmarks/bench_distributed.py``). False, as in PyTorch's
        DistributedDataParallel and Lightning, normalizes each process's part with its
        own statistics, as a smaller batch would. Either way the recalibration
        (``recalibrate_bn``) computes the running statistics over the global batches,
        and every process ends with the same model. Ignored in one process.
        ``n`` processes take exactly the steps of one process (to float rounding)
        when batch norms are synchronized, the network draws no random numbers while
        training (no dropout or stochastic depth: each process draws its own), and
        every epoch's last batch needs neither padding nor joining: the number of
        training images modulo ``batch_size`` is 0, or a multiple of ``n`` larger
        than ``n`` (larger than 0 when no trained batch norm sees a single value per
        channel of an image). Class weights are normalized over the global batch, as
        in one process. With ``early_stopping``, a batch norm that keeps no running
        statistics normalizes each process's validation rows with their own
        statistics, so validation then differs from one process's.
    collective_timeout : float, default=300.0
        With ``devices``, seconds a process waits for the others in one collective
        (averaging gradients, gathering features, summing metrics) before it fails;
        ``fit`` then raises an error that names the process and the step. Applies to
        the process group skdeep starts: always with spawned processes; under
        ``torchrun``, the group made by the first data-parallel ``fit`` of the script
        (or by the script itself) keeps its own timeout.

    Attributes
    ----------
    classes_ : ndarray
        The class labels.
    model_ : torch.nn.Module
        The fine-tuned network (in eval mode, on ``device_``).
    head_name_ : str
        Name of the new classifier head inside ``model_``. timm models with several
        classifiers (distilled DeiT: ``head`` and ``head_dist``) get all of them new,
        trained at ``lr``; this is the first. ``transform`` gives what they receive,
        timm's pre-logits, as :class:`~skdeep.FeatureExtractor`'s ``"penultimate"``.
    frozen_modules_ : list of str
        Names of the modules that were not trained.
    history_ : list of dict
        One record per epoch: ``train_loss``, ``train_accuracy``, ``valid_loss`` and
        ``valid_accuracy`` (with early stopping), ``lr`` and ``seconds``.
    n_epochs_ : int
        Epochs run.
    best_epoch_ : int
        Epoch whose weights ``model_`` holds.
    device_, precision_, preprocessing_
        As in :class:`~skdeep.FeatureExtractor`.

    Examples
    --------
    >>> import numpy as np
    >>> from skdeep import FineTuneClassifier
    >>> rng = np.random.default_rng(0)
    >>> X = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    >>> y = np.array(["cat", "dog"] * 8)
    >>> clf = FineTuneClassifier("resnet18", weights=None, image_size=32, max_epochs=1,
    ...                          batch_size=8, random_state=0).fit(X, y)
    >>> clf.predict(X[:3]).shape, clf.predict_proba(X[:3]).shape
    ((3,), (3, 2))
    """

    _parameter_constraints: ClassVar[dict] = FINE_TUNE_CONSTRAINTS

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
        self.backbone = backbone
        self.weights = weights
        self.image_size = image_size
        self.image_shape = image_shape
        self.value_range = value_range
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.lr = lr
        self.backbone_lr = backbone_lr
        self.optimizer = optimizer
        self.weight_decay = weight_decay
        self.scheduler = scheduler
        self.freeze = freeze
        self.augment = augment
        self.label_smoothing = label_smoothing
        self.class_weight = class_weight
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.tol = tol
        self.recalibrate_bn = recalibrate_bn
        self.random_state = random_state
        self.device = device
        self.precision = precision
        self.num_workers = num_workers
        self.verbose = verbose
        self.warm_start = warm_start
        self.devices = devices
        self.sync_batch_norm = sync_batch_norm
        self.collective_timeout = collective_timeout

    _derived_state = ("_predictor_model", "_context")

    # --- fitting --------------------------------------------------------------------------

    @fit_context
    def fit(self, X, y):
        """Fine-tune the backbone on images ``X`` with labels ``y``.

        Parameters
        ----------
        X : images
            See :meth:`FeatureExtractor.transform <skdeep.FeatureExtractor.transform>`.
        y : array-like of shape (n_images,)
            Class labels (strings, integers, ...).

        Returns
        -------
        self : FineTuneClassifier
            The fitted classifier.
        """
        self._begin_fit()  # until this fit ends, the estimator is not fitted
        source = self._image_source(X)
        y = check_labels(y, len(source))
        codes = self._encode_labels(y, np.ones(len(y), dtype=bool))
        processes = self._processes_to_spawn()
        if processes is not None:
            return self._fit_in_processes(processes, codes, X=X, y=y)
        self._train(source, codes)
        return self

    # --- data-parallel training -----------------------------------------------------------

    def _processes_to_spawn(self):
        """Return the processes ``fit`` must start (None: it trains here, alone or as a rank)."""
        processes = _distributed.check_devices(self.devices, resolve_device(self.device))
        if processes is None or _distributed.in_process_group():
            return None
        return processes

    def _fit_in_processes(self, processes, codes: np.ndarray, **arguments):
        """Fit in data-parallel processes; take rank 0's fitted state as this estimator's.

        The data plan of the ranks is made here first, so that a fit it refuses (too few
        rows for the processes) fails before any process starts.
        """
        world_size = len(processes) if isinstance(processes, list) else int(processes)
        self._check_data_plan(codes, world_size)
        payload = copy.deepcopy(self)  # a RandomState is copied as it stands
        if isinstance(self.random_state, np.random.RandomState):
            # The ranks draw from copies; the caller's generator moves on as one
            # process's fit moves it, so that the next fit with it differs.
            self._torch_seed()
        fitted = _distributed.spawn_fit(
            payload, _fit_in_rank, arguments, processes, self.collective_timeout
        )
        parameters = self.get_params(deep=False)
        for key, value in vars(fitted).items():
            # (the ranks' _built_from holds their copy of a module backbone; keep ours)
            if key not in parameters and key != "_built_from":
                setattr(self, key, value)
        return self

    def _check_data_plan(self, codes: np.ndarray, world_size: int) -> None:
        """Make the data plan that the ranks will make, for its checks alone.

        On the network built here (or the fitted one, for a warm start): whether batch
        norms train decides the smallest part a rank may take.
        """
        n_labeled = int((codes >= 0).sum())
        n_train = n_labeled - self._validation_count(n_labeled)
        if self.warm_start and hasattr(self, "model_"):
            model, head_name, preprocessing = self.model_, self.head_name_, self.preprocessing_
        else:
            with fork_rng(torch.device("cpu"), 0):  # leave the caller's generator alone
                model, head_name, preprocessing = self._build_network()
        frozen = self._frozen_module_names(model, head_name)
        device = next(model.parameters()).device
        self._data_plan(n_train, model, frozen, 0, preprocessing.crop_size, device, world_size)

    def _separate_domain_passes(self) -> bool:
        """Whether a step runs source and target images through the network apart."""
        return False

    def _data_plan(
        self, n_train, model, frozen, seed, size, device, world_size=1, rank=0
    ) -> DataPlan:
        """Which rows each rank trains at each step (see :mod:`skdeep._data_plan`).

        Parts hold two images or more where a trained batch norm would see a single
        value per channel for one image of ``size`` px (found with one forward pass).
        """
        frozen_modules = [model.get_submodule(name) for name in frozen]
        norms = training_batch_norms(model, frozen_modules)
        single = (
            single_values_per_channel(model, norms, frozen_modules, size, device) if norms else []
        )
        rows = "training image(s)"
        if self.early_stopping:
            rows += (
                f" (once early_stopping held out validation_fraction={self.validation_fraction})"
            )
        return DataPlan(
            n_train,
            self.batch_size,
            world_size,
            rank,
            seed,
            min_part=MIN_PART_WITH_BATCH_NORM if single else 1,
            devices=self.devices,
            domains_apart=self._separate_domain_passes(),
            why=f"the batch norm {single[0]!r} sees one value per channel per image"
            if single
            else "",
            rows=rows,
        )

    def _join_ranks(self):
        """Join the ranks this fit trains with (None: it trains alone)."""
        return _distributed.active_context(
            self.devices, resolve_device(self.device), self.collective_timeout
        )

    def _distribute(self, model: nn.Module, objective) -> nn.Module | None:
        """Prepare ``model`` and ``objective`` for data-parallel steps; return the DDP wrapper.

        Synchronized batch norms (``sync_batch_norm``), DistributedDataParallel, and the
        objective's own collectives (gathered features, a synchronized domain classifier).
        None when training alone.
        """
        context = self._context
        if context is None:
            return None
        if self.sync_batch_norm:
            _distributed.synchronize_batch_norms(model, context)
        objective.distribute(context)
        return context.wrap(model)

    def _leave_ranks(self, model: nn.Module | None) -> None:
        """Put the plain batch norms back and forget the ranks (the fitted model is plain)."""
        if self._context is not None and model is not None:
            _distributed.unsynchronize_batch_norms(model)
        self._context = None

    def _encode_labels(self, y: np.ndarray, labeled: np.ndarray) -> np.ndarray:
        """Set ``classes_`` and return integer codes (-1 for rows not ``labeled``)."""
        classes, codes = encode_labels(y, labeled)
        if self.warm_start and hasattr(self, "classes_"):
            if not np.array_equal(classes, self.classes_):
                raise ValueError(
                    f"warm_start=True needs the classes of the previous fit, {self.classes_}; "
                    f"got {classes}"
                )
        self.classes_ = classes
        return codes

    # --- training, step by step -----------------------------------------------------------

    def _train(
        self,
        source,
        codes: np.ndarray,
        make_objective: Callable | None = None,
        targets: tuple = (),
    ) -> None:
        """Build (or reuse) the network and train it on the labeled ``codes``.

        ``make_objective(criterion, rng, plan)`` returns the training objective
        (default: :class:`~skdeep._objectives.Supervised`); domain adaptation passes
        its own, and its target images and rows as ``targets`` (for the check that
        every rank was given the same inputs).
        """
        self._begin_fit()
        context = self._context = self._join_ranks()
        model = objective = None
        try:
            with _distributed.watch_collectives(context, "the start of fit"):
                if context is not None:
                    inputs = "X and y" + (" and the target images" if targets else "")
                    context.check_same_inputs(inputs_summary(source, codes, *targets), inputs)
                seed = agree_seed(self._torch_seed(), context)
            rng = np.random.default_rng(seed)
            train_rows, valid_rows = self._split_validation(np.flatnonzero(codes >= 0), codes, rng)
            model = self._prepare_network(seed)
            frozen = self._freeze(model)
            ranks = (1, 0) if context is None else (context.world_size, context.rank)
            size = self.preprocessing_.crop_size
            plan = self._data_plan(len(train_rows), model, frozen, seed, size, self.device_, *ranks)
            with fork_rng(self.device_, rank_seed(seed, plan.rank)):  # dropout: per rank
                criterion = self._loss_function(codes[train_rows])
                objective = (make_objective or _supervised)(criterion, rng, plan)
                with _distributed.watch_collectives(context, "the start of training"):
                    forward_model = self._distribute(model, objective)
                trainer = self._trainer(model, frozen, plan, objective.parameters(), forward_model)
                augmentations = parse_augment(self.augment)
                generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
                result = trainer.fit(
                    objective,
                    epoch_batches=lambda epoch: self._epoch_batches(
                        source, codes, train_rows, plan.epoch(epoch), generator, augmentations
                    ),
                    n_samples=len(train_rows),
                    validate=(
                        (lambda: self._evaluate(source, codes, valid_rows))
                        if len(valid_rows)
                        else None
                    ),
                )
                with _distributed.watch_collectives(context, "the batch-norm recalibration"):
                    self._recalibrate(model, trainer, objective, source, train_rows, plan, result)
        finally:
            if objective is not None:
                objective.close()
            self._leave_ranks(model)
        self._record_training(frozen, result)

    def _begin_fit(self) -> None:
        """Start a fit: check a warm start, and forget the last training until this ends.

        A warm start continues the fitted network, so the parameters that built it and
        its preprocessing (:data:`NETWORK_PARAMETERS`) must be those of its fit; a new
        network records them. Warm starts keep their history.
        """
        continues = self.warm_start and hasattr(self, "model_")
        built_from = getattr(self, "_built_from", None)
        if continues and built_from is not None:
            for name, value in built_from.items():
                now = getattr(self, name)
                if not (now is value if isinstance(value, nn.Module) else now == value):
                    raise ValueError(
                        f"warm_start=True continues training the fitted network, built with "
                        f"{name}={_short(value)}; got {name}={_short(now)}: set {name} "
                        "back, or warm_start=False to build a new network"
                    )
        if not continues:
            self._built_from = {name: getattr(self, name) for name in NETWORK_PARAMETERS}
        if not self.warm_start:
            vars(self).pop("history_", None)
        self._predictor_model = None

    def _prepare_network(self, seed: int) -> nn.Module:
        """Build the network (or keep the warm-started one) on this rank's device."""
        if not (self.warm_start and hasattr(self, "model_")):
            with fork_rng(torch.device("cpu"), seed):  # the new head's initialisation
                self.model_, self.head_name_, self.preprocessing_ = self._build_network()
        self._resolve_hardware()
        if self._context is not None:
            self.device_ = self._context.device
        model = self.model_ = self.model_.to(self.device_, memory_format=torch.channels_last)
        if not hasattr(self, "history_"):  # a new network (warm starts trained already)
            check_input_size(model, self.preprocessing_.crop_size, self.device_)
        return model

    def _recalibrate(self, model, trainer, objective, source, train_rows, plan, result) -> None:
        """Recompute the trained batch norms' statistics (``recalibrate_bn``), as one process.

        With unsynchronized batch norms, the pass synchronizes them, so that the
        statistics are those of the global batches; without a pass, every rank keeps
        rank 0's.
        """
        context = self._context
        local_norms = context is not None and not self.sync_batch_norm
        if not self.recalibrate_bn or result.interrupted:
            if local_norms:
                context.broadcast_buffers(model)
            return
        if local_norms:
            _distributed.synchronize_batch_norms(model, context)
        batches = self._step_images(source, train_rows, plan.in_order())
        recalibrate_batch_norm(
            model,
            trainer.frozen,
            objective.calibration_batches(batches),
            self.device_,
            self.precision_,
        )

    def _record_training(self, frozen: list[str], result) -> None:
        self.frozen_modules_ = frozen
        self.history_ = (getattr(self, "history_", []) if self.warm_start else []) + result.history
        self.n_epochs_ = len(result.history)
        self.best_epoch_ = result.best_epoch

    def _trainer(
        self, model: nn.Module, frozen: list[str], plan: DataPlan, extra=(), forward_model=None
    ) -> Trainer:
        """Make the training loop with this estimator's optimizer, schedule and stopping.

        ``extra`` parameters (a training objective's own) learn at the head's rate;
        ``forward_model`` is the DistributedDataParallel wrapper in data-parallel fits.
        """
        # Every classifier head (two for distilled timm models) learns at the head's rate.
        head = nn.ModuleList(model.get_submodule(name) for name in head_names(model))
        backbone_lr = self.lr if self.backbone_lr is None else self.backbone_lr
        optimizer = make_optimizer(
            self.optimizer, model, head, self.lr, backbone_lr, self.weight_decay, extra
        )
        total_steps = self.max_epochs * plan.steps_per_epoch
        return Trainer(
            model=model,
            optimizer=optimizer,
            scheduler=make_scheduler(optimizer, self.scheduler, total_steps),
            device=self.device_,
            dtype=self.precision_,
            max_epochs=self.max_epochs,
            steps_per_epoch=plan.steps_per_epoch,
            early_stopping=self.early_stopping,
            n_iter_no_change=self.n_iter_no_change,
            tol=self.tol,
            frozen=[model.get_submodule(name) for name in frozen],
            verbose=bool(self.verbose),
            name=type(self).__name__,
            forward_model=forward_model,
            context=self._context,
        )

    def _build_network(self):
        """Build the backbone with a new head on the CPU.

        Returns ``(module, head name, preprocessing)``.
        """
        backbone = load_backbone(self.backbone, self.weights, self.image_size)
        drop_auxiliary_heads(backbone.module)
        head_name = replace_head(backbone.module, len(self.classes_))
        preprocessing = backbone.preprocessing.with_image_size(self.image_size)
        # A timm model's "penultimate" and "logits" are read through its own head.
        check_timm_forward(backbone.module, preprocessing.crop_size)
        return backbone.module, head_name, preprocessing

    def _training_size(self) -> int | None:
        # "auto" precision depends on the input size; the same precision predicts.
        return self.preprocessing_.crop_size

    def _freeze(self, model: nn.Module) -> list[str]:
        """Turn off gradients of the frozen modules; return their names."""
        names = self._frozen_module_names(model, self.head_name_)
        model.requires_grad_(True)
        if self.freeze == "backbone":
            heads = [model.get_submodule(name) for name in head_names(model)]
            head_ids = {id(p) for head in heads for p in head.parameters()}
            for parameter in model.parameters():
                parameter.requires_grad_(id(parameter) in head_ids)
            return names
        for name in names:
            model.get_submodule(name).requires_grad_(False)
        return names

    def _frozen_module_names(self, model: nn.Module, head_name: str) -> list[str]:
        """Return the modules that ``freeze`` names (every stage for "backbone"), checked."""
        freeze = self.freeze
        stages = backbone_stages(model)
        if freeze is None:
            return []
        if freeze == "backbone":
            return stages
        if isinstance(freeze, Integral):
            if freeze > len(stages):
                raise ValueError(
                    f"freeze={freeze} but the backbone has {len(stages)} stages: {stages}"
                )
            return stages[:freeze]
        names = list(freeze)
        if not all(isinstance(name, str) for name in names):
            raise ValueError(f"freeze must list module names; got {freeze!r}")
        check_layer_names(model, names, argument="freeze")
        for name in names:
            if name in (PENULTIMATE, LOGITS) or holds_head(model, name):
                raise ValueError(f"freeze: {name!r} holds the new classifier head")
        return names

    def _validation_count(self, n_labeled: int) -> int:
        """Labeled rows held out for early stopping (0 without it)."""
        if not self.early_stopping:
            return 0
        n_valid = int(np.ceil(self.validation_fraction * n_labeled))
        if n_labeled - n_valid < 2:
            raise ValueError(
                f"validation_fraction={self.validation_fraction} leaves "
                f"{n_labeled - n_valid} training image(s) of {n_labeled}"
            )
        return n_valid

    def _split_validation(self, labeled: np.ndarray, codes: np.ndarray, rng):
        n_valid = self._validation_count(len(labeled))
        if not n_valid:
            return labeled, labeled[:0]
        labels = codes[labeled]
        counts = np.bincount(labels)
        stratify = labels if counts[counts > 0].min() >= 2 and n_valid >= len(counts) else None
        train_rows, valid_rows = train_test_split(
            labeled,
            test_size=n_valid,
            stratify=stratify,
            random_state=int(rng.integers(2**31)),
        )
        return np.sort(train_rows), np.sort(valid_rows)

    def _loss_function(self, train_codes: np.ndarray) -> nn.Module:
        weight = None
        if self.class_weight is not None:
            classes = np.arange(len(self.classes_))
            if isinstance(self.class_weight, dict):
                unknown = set(self.class_weight) - set(self.classes_.tolist())
                if unknown:
                    raise ValueError(
                        "class_weight names labels that are not classes: "
                        f"{sorted(unknown, key=str)}"
                    )
                by_code = {
                    int(np.flatnonzero(self.classes_ == label)[0]): value
                    for label, value in self.class_weight.items()
                }
                values = np.array([by_code.get(code, 1.0) for code in classes], dtype=float)
            else:
                present = np.unique(train_codes)
                values = np.ones(len(classes))
                values[present] = compute_class_weight("balanced", classes=present, y=train_codes)
            weight = torch.tensor(values, dtype=torch.float32, device=self.device_)
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=self.label_smoothing)

    def _epoch_batches(self, source, codes, rows, steps, generator, augmentations):
        """Yield this rank's augmented training batches of one epoch: (images, label codes).

        ``steps`` come from the data plan; augmentation draws for each whole global
        batch and takes this rank's share of the draws, so that every part gets what
        one process would give it.
        """
        labels = torch.as_tensor(codes[rows[np.concatenate([s.rows for s in steps])]])
        labels = labels.to(self.device_)
        start = 0
        for step, images in zip(steps, self._step_images(source, rows, steps), strict=True):
            images = augment(images, augmentations, generator, step.share, step.global_size)
            yield images, labels[start : start + len(images)]
            start += len(images)

    def _step_images(self, source, rows: np.ndarray, steps) -> Iterator[torch.Tensor]:
        """Network-ready images of the plan's ``steps`` (positions into ``rows``)."""
        if not steps:
            return iter(())
        positions = rows[np.concatenate([step.rows for step in steps])]
        batches = self._input_batches(source, positions, batch_size=len(steps[0].rows))
        return regroup(batches, [len(step.rows) for step in steps])

    def _evaluate(self, source, codes, rows) -> tuple[float, float]:
        """Compute the validation loss (cross-entropy) and accuracy of the training network.

        In data-parallel training, each process scores its share of the rows and the
        sums are added up.
        """
        self.model_.eval()
        context = self._context
        if context is not None:
            rows = evaluation_rows(rows, context.rank, context.world_size)
        loss, correct = torch.zeros(()), torch.zeros(())
        if len(rows):
            logits = self._pooled_features(source, self.model_, [LOGITS], None, rows, None, False)
            targets = torch.as_tensor(codes[rows])
            loss = F.cross_entropy(torch.from_numpy(logits), targets, reduction="sum")
            correct = torch.tensor(float((logits.argmax(1) == codes[rows]).sum()))
        totals = torch.stack([loss, correct, torch.tensor(float(len(rows)))])
        if context is not None:
            totals = context.sum(totals).cpu()
        return (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item()

    # --- prediction -----------------------------------------------------------------------

    def __sklearn_is_fitted__(self) -> bool:
        """Tell whether a fit has ended (``classes_`` is set before training starts)."""
        return hasattr(self, "history_")

    def _predictor(self) -> nn.Module:
        """Return the fitted network rewritten for inference, built on first use.

        The rewrites are FeatureExtractor's: batch norms folded, convolutions fused with
        their activations.
        """
        check_is_fitted(self)
        if getattr(self, "_predictor_model", None) is None:
            model = copy.deepcopy(self.model_).eval().requires_grad_(False)
            self._predictor_model = optimize_for_inference(model, self.device_, self.precision_)
        return self._predictor_model

    def _outputs(self, X, layer: str, indices=None) -> np.ndarray:
        """Rows of ``layer`` ("logits" or "penultimate") for the images ``X``."""
        check_is_fitted(self)
        source = self._image_source(X)
        return self._pooled_features(source, self._predictor(), [layer], "avg", indices)

    def decision_function(self, X):
        """Class scores (logits).

        For two classes, the score of the second class minus that of the first, as
        scikit-learn's binary classifiers return.

        Parameters
        ----------
        X : images
            See :meth:`fit`.

        Returns
        -------
        ndarray of shape (n_images, n_classes) or (n_images,)
            The scores.
        """
        logits = self._outputs(X, LOGITS)
        return logits[:, 1] - logits[:, 0] if logits.shape[1] == 2 else logits

    def predict_proba(self, X):
        """Class probabilities (softmax of the logits, rows sum to 1).

        Parameters
        ----------
        X : images
            See :meth:`fit`.

        Returns
        -------
        ndarray of shape (n_images, n_classes), float64
            The probabilities, columns in the order of ``classes_``.
        """
        logits = self._outputs(X, LOGITS).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        probabilities = np.exp(logits)
        return probabilities / probabilities.sum(axis=1, keepdims=True)

    def predict(self, X):
        """Predicted class labels.

        Parameters
        ----------
        X : images
            See :meth:`fit`.

        Returns
        -------
        ndarray of shape (n_images,)
            Elements of ``classes_``.
        """
        best = self._outputs(X, LOGITS).argmax(axis=1)
        return self.classes_[best]

    def transform(self, X):
        """Compute the fine-tuned penultimate features (the head's input).

        Parameters
        ----------
        X : images
            See :meth:`fit`.

        Returns
        -------
        ndarray of shape (n_images, n_features), float32
            One row per image, columns named by :meth:`get_feature_names_out`.
        """
        return self._outputs(X, PENULTIMATE)

    def get_feature_names_out(self, input_features=None):
        """Names of the columns of :meth:`transform`: ``penultimate_0``, ...

        Parameters
        ----------
        input_features : ignored
            Present for scikit-learn compatibility (images have no input names).

        Returns
        -------
        ndarray of str
            One name per column.
        """
        check_is_fitted(self)
        head = self.model_.get_submodule(self.head_name_)
        width = head.in_features if isinstance(head, nn.Linear) else head.in_channels
        if has_timm_head(self.model_):  # timm's pre-logits, of all its heads
            width = getattr(self.model_, "head_hidden_size", None) or self.model_.num_features
        names = pooled_names(PENULTIMATE, (1, width), Layout(ROWS), "avg")
        return np.asarray(names, dtype=object)

    def __sklearn_tags__(self):
        """Declare image input (3-D arrays) and deterministic fits."""
        tags = super().__sklearn_tags__()
        tags.input_tags.three_d_array = True
        tags.non_deterministic = False
        return tags


def inputs_summary(source, codes: np.ndarray, target=None, target_rows=None) -> list[int]:
    """Return a few integers that differ when two processes were given other inputs.

    The numbers of images and labeled rows, and a digest of the labels and of 64 evenly
    spaced images (and target images; files by name and size, see
    :meth:`~skdeep._images.ImageSource.sample_digest`): hashing every image of a large
    set would cost as much as reading it, while a rank given its own shard differs in
    all of these. Other pixels between the sampled images go unseen.
    """
    digest = hashlib.blake2b(digest_size=8)
    digest.update(np.ascontiguousarray(codes).tobytes())
    counts = [len(source), int((codes >= 0).sum())]
    for images, rows in ((source, None), (target, target_rows)):
        if images is None:
            continue
        sample = np.unique(np.linspace(0, len(images) - 1, 64).astype(int)) if len(images) else []
        digest.update(images.sample_digest(sample))
        if rows is not None:
            digest.update(np.ascontiguousarray(rows).tobytes())
            counts.append(len(rows))
    return [*counts, int.from_bytes(digest.digest(), "little", signed=True)]


def _supervised(criterion: nn.Module, rng, plan) -> Supervised:
    """Return the objective of plain fine-tuning: the criterion on labeled batches."""
    return Supervised(criterion)


def _fit_in_rank(estimator, **arguments):
    """Fit ``estimator`` in one data-parallel process (see :mod:`skdeep._distributed`)."""
    return estimator.fit(**arguments)


def _short(value) -> str:
    """Describe a parameter value in a message: a module by its class and identity."""
    if isinstance(value, nn.Module):
        return f"<{type(value).__name__} module at {id(value):#x}>"
    return repr(value)
