"""FeatureExtractor: a frozen pretrained CNN as a scikit-learn transformer."""

from __future__ import annotations

import copy
import uuid
from numbers import Integral
from typing import ClassVar

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted, check_memory

from . import _quantize, _timm
from ._base import BACKBONE_CONSTRAINTS, BackboneMixin, shared_network
from ._compat import HasMethods, Interval, StrOptions, fit_context
from ._device import fork_rng
from ._feature_cache import FeatureCache
from ._identity import architecture_digest, feature_identity, identity_digest
from ._images import is_dask_array
from ._inference import optimize_for_inference
from ._layouts import POOLINGS, pooled_names
from ._network import LOGITS, PENULTIMATE, resolve_layer_names
from ._preprocess import Preprocessing
from ._taps import intermediate_readers, parse_layers, verified_layouts
from ._weights import WeightsChangedError, state_digest
from .backbones import load_backbone


class FeatureExtractor(BackboneMixin, TransformerMixin, BaseEstimator):
    """Features of a frozen pretrained CNN, as rows for scikit-learn estimators.

    ``fit`` loads the network (nothing is learned); ``transform`` runs batched
    inference and returns one row of pooled features per image. Only the layers up
    to the deepest requested one are computed. ``value_range``, ``image_shape``,
    ``batch_size``, ``num_workers``, ``memory`` and ``verbose`` are read each time
    ``transform`` runs; the other parameters shape what ``fit`` builds, so setting one
    of them after ``fit`` makes ``transform`` ask for ``fit`` again
    (:class:`~sklearn.exceptions.NotFittedError`) rather than use stale settings.

    Parameters
    ----------
    backbone : str or torch.nn.Module, default="mobilenet_v2"
        A torchvision classification model name (see
        :func:`skdeep.backbones.classification_models`); ``"timm:<name>"`` for a timm
        model (``pip install "skdeep[timm]"``), optionally with a pretrained tag
        (``"timm:convnext_tiny.fb_in22k"``; without one, timm's default tag); or a
        module, which is deep-copied and never changed.
    weights : str, path or None, default="IMAGENET1K_V1"
        For torchvision models, a weights name (``"IMAGENET1K_V1"``, ``"DEFAULT"``,
        ...), looked for in the torch hub cache, then in offline weights packages,
        then downloaded. For timm models, ``"DEFAULT"`` or ``"IMAGENET1K_V1"`` mean
        the pretrained weights of the tag, looked for in the Hugging Face cache, then
        downloaded. Either way: the path of a ``state_dict`` file, or None for random
        initialisation (seeded by ``random_state``). Weights that cannot be found
        raise :class:`~skdeep.WeightsUnavailableError` saying how to get them, never
        random weights. For a module backbone, a weights name keeps the module's own
        parameters, and None draws them again (each layer's ``reset_parameters``,
        seeded by ``random_state``; a module with parameters outside such layers, a
        bare ``nn.Parameter``, is refused).
    layers : str, list of str or None, default=None
        Module names to tap (keys of ``dict(model.named_modules())``), or
        ``"penultimate"``: the input of the classifier head, i.e. the pooled features
        the classifier sees (for timm models, timm's pre-logits,
        ``forward_head(forward_features(x), pre_logits=True)``: for distilled models
        the mean of the class and distillation tokens), or ``"logits"``: the
        network's output. timm models also take ``"intermediate:N"``, the N-th of the
        intermediate features timm lists in ``feature_info`` (transformer blocks, CNN
        stages; ``-1`` is the last), as its ``forward_intermediates(indices=...)``
        counts and computes them: a hook on the module ``feature_info`` names reads it
        where that gives the same values, ``forward_intermediates`` itself elsewhere
        (then ``layers_`` names it ``"intermediate:K"``, K from 0). None means
        ``"penultimate"``. With several layers each is pooled and the results are
        concatenated in the order given.
    pooling : {"avg", "max", "avgmax", "cls", "mean", "cls+mean"} or None, default="avg"
        How each layer's output becomes rows, by its layout. Maps (channels-first or
        channels-last): global average ("avg" or "mean"), global max, or both
        concatenated ("avgmax"). Token sequences (ViT, DeiT, DINOv2, EVA): "cls"
        (the class token), "mean" or "avg" (mean of the patch tokens, without class
        and register tokens), "cls+mean", "max" (over the patch tokens) or "avgmax".
        None flattens the output. Outputs that are already rows (``"penultimate"``)
        are used as they are.
    layouts : dict or None, default=None
        Layouts of tapped layers, keyed as in ``layers``: "channels_first"
        ``(N, C, H, W)``, "channels_last" ``(N, H, W, C)``, "rows", "tokens",
        "tokens:N" (N leading class and register tokens) or "tokens:N:cls" (the first
        of them a class token). ``fit`` works each layout out from what the model
        family and the model itself declare, and checks it with a probe (the network
        runs on images twice as wide: the axes that follow the width are spatial); it
        raises an error naming the layer where the two disagree or neither can tell.
        A declared layout is checked the same way; a key that names no tapped layer
        is an error.
    image_size : int or None, default=None
        Network input size. None follows the weights' own preprocessing (for
        ImageNet weights: shorter side resized to 256, center crop 224). An int
        resizes the shorter side to ``image_size`` and center-crops a square of that
        size; small images such as 28x28 digits need no 224 px input.
    image_shape : tuple or None, default=None
        ``(H, W)`` or ``(H, W, C)`` of one image when ``X`` holds flat rows, e.g.
        ``(8, 8)`` for ``load_digits().data``.
    value_range : (float, float) or None, default=None
        Pixel values that mean black and white, two finite numbers. None: (0, 255)
        for integer images and files, (0, 1) for float images.
        ``load_digits().data`` needs (0, 16).
    batch_size : int, default=64
        Images per forward pass. Float results can differ in the last bits between
        batch sizes, so feature stores and caches keep them apart.
    device : {"auto", "cpu", "cuda", "cuda:N"} or torch.device, default="auto"
        Where the network runs; "auto" picks CUDA when available. Resolved into
        ``device_``; outputs are always NumPy arrays.
    precision : {"auto", "float32", "bfloat16", "float16", "int8"}, default="auto"
        Compute precision (autocast). "auto" is float16 on CUDA, bfloat16 on a CPU
        with AVX512-BF16 or AMX, float32 elsewhere. "int8" (x86 CPUs only, opt-in:
        it changes the features) quantizes the network after calibrating it in
        ``fit`` on the images given there (PyTorch's post-training static
        quantization, x86 backend, with bias correction; the first convolution stays
        in float); see ``calibration_size``. Networks that torch.fx cannot trace
        are refused with a clear error. On CUDA, "float32" follows PyTorch's TF32
        switches: cuDNN convolutions compute in TF32 by default on Ampere and newer
        GPUs (10 bits of mantissa: relative errors of about 1e-3 per convolution); set
        ``torch.backends.cudnn.allow_tf32 = False`` for IEEE float32.
    num_workers : int, default=0
        Worker processes that decode image files (0: in the main process).
    calibration_size : int, default=256
        With ``precision="int8"``: at most this many of the images given to ``fit``
        (spread evenly over them) calibrate the quantization.
    memory : str, joblib.Memory or None, default=None
        Folder (or ``joblib.Memory``) where each image's features are cached. With
        it, a grid search over a downstream classifier runs the backbone once per
        image and extractor setting, not once per fold and candidate.
    random_state : int, RandomState or None, default=None
        Seeds the random initialisation when ``weights=None``.
    verbose : bool or int, default=False
        Show a progress bar while transforming.

    Attributes
    ----------
    model_ : torch.nn.Module
        The frozen network on ``device_``, in eval mode. Batch norms are folded into
        the convolutions and, on the CPU, convolutions run fused with the activation
        after them; module names are those of the original network.
    device_ : torch.device
        The device in use.
    precision_ : torch.dtype
        The compute dtype in use. Pickles carry it: a copy computes at the precision
        of the original, wherever it is loaded.
    preprocessing_ : skdeep._preprocess.Preprocessing
        Resize, crop and normalization applied to every image.
    layers_ : list of str
        The tapped layers, in output order, by module name (``"intermediate:N"``
        resolved to its module, or to ``"intermediate:K"`` where timm's
        ``forward_intermediates`` reads it).
    layouts_ : dict of str
        The layout of each tapped layer (see ``layouts``), e.g. ``"tokens:1:cls"``.
    feature_names_out_ : ndarray of str
        Names of the output columns, e.g. ``layer4_avg_0``.
    n_features_out_ : int
        Number of output columns.
    weights_digest_, architecture_digest_ : str
        Digests of the network's weights and of how it computes (module settings
        such as strides and flags), as fitted. A copy that rebuilds its network (an
        unpickled extractor, a Dask worker) and finds other weights raises
        :class:`~skdeep.WeightsChangedError` instead of computing other features.

    Examples
    --------
    >>> import numpy as np
    >>> from skdeep import FeatureExtractor
    >>> images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    >>> extractor = FeatureExtractor("resnet18", weights=None, layers=["layer2", "layer4"],
    ...                              image_size=32, random_state=0)
    >>> extractor.fit_transform(images).shape
    (4, 640)
    >>> extractor.get_feature_names_out()[:2].tolist()
    ['layer2_avg_0', 'layer2_avg_1']
    """

    _derived_state = ("_model",)
    # Parameters that fit turns into the fitted network and feature layout; transform
    # reads the others (value_range, image_shape, batch_size, ...) each time it runs.
    _FIT_PARAMETERS = (
        "backbone",
        "weights",
        "layers",
        "pooling",
        "layouts",
        "image_size",
        "device",
        "precision",
        "calibration_size",
        "random_state",
    )
    _parameter_constraints: ClassVar[dict] = {
        **BACKBONE_CONSTRAINTS,
        "layers": [str, list, tuple, None],
        "pooling": [StrOptions(set(POOLINGS) - {None}), None],
        "layouts": [dict, None],
        "memory": [None, str, HasMethods(["cache"])],
        "calibration_size": [Interval(Integral, 1, None, closed="left")],
    }

    def __init__(
        self,
        backbone="mobilenet_v2",
        weights="IMAGENET1K_V1",
        layers=None,
        pooling="avg",
        layouts=None,
        image_size=None,
        image_shape=None,
        value_range=None,
        batch_size=64,
        device="auto",
        precision="auto",
        num_workers=0,
        memory=None,
        calibration_size=256,
        random_state=None,
        verbose=False,
    ):
        self.backbone = backbone
        self.weights = weights
        self.layers = layers
        self.pooling = pooling
        self.layouts = layouts
        self.image_size = image_size
        self.image_shape = image_shape
        self.value_range = value_range
        self.batch_size = batch_size
        self.device = device
        self.precision = precision
        self.num_workers = num_workers
        self.memory = memory
        self.calibration_size = calibration_size
        self.random_state = random_state
        self.verbose = verbose

    @fit_context
    def fit(self, X=None, y=None):
        """Load the backbone and work out the feature layout.

        Nothing is learned from the data: ``X`` is only validated, when given (and, at
        ``precision="int8"``, calibrates the quantization).

        Parameters
        ----------
        X : images, optional
            See :meth:`transform`.
        y : ignored
            Present for scikit-learn compatibility.

        Returns
        -------
        self : FeatureExtractor
            The fitted extractor.
        """
        source = None if X is None else self._image_source(X)
        self._resolve_hardware()
        if self.precision_ == torch.qint8 and source is None:
            raise ValueError(
                "precision='int8' needs calibration images: call fit(X) with images like "
                "those you will transform (calibration_size bounds how many are used)"
            )
        requested = [PENULTIMATE] if self.layers is None else parse_layers(self.layers, "layers")
        self.layers_ = requested
        self._random_weights = None
        self._int8_calibration = None
        self.weights_digest_ = self.architecture_digest_ = None  # recorded by this build
        network, self.preprocessing_ = self._build_network()
        size = self.preprocessing_.crop_size
        # timm intermediates that a hook cannot read come from forward_intermediates.
        self.layers_ = intermediate_readers(
            network, requested, self.layers_, self._declared_layouts(requested), size, self.device_
        )
        declared = self._declared_layouts(requested)
        probe, layouts = verified_layouts(
            network, self.layers_, self.pooling, declared, size, self.device_
        )
        if {PENULTIMATE, LOGITS} & set(probe.outputs):  # read with timm's own head
            _timm.check_forward(network, probe.inputs)
        self._stop_layer = probe.deepest
        self.layouts_ = {layer: str(layout) for layer, layout in layouts.items()}
        names = []
        for layer, layout in layouts.items():
            shape = tuple(probe.outputs[layer].shape)
            names += pooled_names(layer, shape, layout, self.pooling)
        self.feature_names_out_ = np.asarray(names, dtype=object)
        self.n_features_out_ = len(names)
        if self.precision_ == torch.qint8:
            self._int8_calibration, model = self._calibrate(network, source)
        else:
            model = self._optimized(network, self.preprocessing_)
        self._model = model
        self._fit_token = uuid.uuid4().hex
        self._fitted_parameters = self._fit_parameters()
        return self

    def _fit_parameters(self) -> dict:
        """Return the parameters that shaped the fitted state (copies of them)."""
        relevant = {
            "random_state": self.weights is None,
            "calibration_size": self.precision == "int8",
        }
        return {
            key: copy.deepcopy(value) if isinstance(value, (list, dict)) else value
            for key in self._FIT_PARAMETERS
            if relevant.get(key, True)
            for value in [getattr(self, key)]
        }

    def _check_fitted(self) -> None:
        """Check that the extractor is fitted with the parameters it has now.

        Raises
        ------
        NotFittedError
            It is not fitted, or a parameter that ``fit`` builds from was set after it.
        """
        check_is_fitted(self)
        fitted = getattr(self, "_fitted_parameters", None)
        if fitted is None:  # fitted by an earlier version of skdeep
            return
        current = self._fit_parameters()
        for key in self._FIT_PARAMETERS:
            if not _same(current.get(key), fitted.get(key)):
                raise NotFittedError(
                    f"{key}={current.get(key)!r} was set after fit, which built this "
                    f"{type(self).__name__} with {key}={fitted.get(key)!r}; call fit (or "
                    f"fit_transform) again to extract with it"
                )

    def _declared_layouts(self, requested: list[str]) -> dict:
        """Key the ``layouts`` parameter by module name; reject keys of untapped layers."""
        by_request = dict(zip(requested, self.layers_, strict=True))
        declared = {}
        for layer, layout in (self.layouts or {}).items():
            if layer not in by_request and layer not in self.layers_:
                raise ValueError(
                    f"layouts: {layer!r} is not a tapped layer; the keys of layouts must be "
                    f"among layers={requested!r}"
                )
            declared[by_request.get(layer, layer)] = layout
        return declared

    def __sklearn_is_fitted__(self) -> bool:
        """Tell whether ``fit`` has worked out the feature layout."""
        return hasattr(self, "n_features_out_")

    @property
    def model_(self) -> torch.nn.Module:
        """The frozen network on ``device_`` (built on first use after unpickling)."""
        self._check_fitted()
        if self._model is None:
            # Every unpickled copy of this fit shares one network per process: a Dask
            # worker builds it once, whatever number of tasks it runs.
            key = (self._fit_token, str(self.device_), str(self.precision_))
            self._model = shared_network(key, lambda: self._optimized(*self._build_network()))
        return self._model

    def _build_network(self) -> tuple[torch.nn.Module, Preprocessing]:
        """Load the backbone in float32, frozen, on ``device_``, and check its identity.

        On the first call (in ``fit``), the digests of the network's architecture and
        weights are recorded, and random weights (``weights=None``) are kept in
        ``_random_weights``: they are the only weights the parameters cannot load
        again. A later call (an unpickled copy, a Dask worker) that finds other
        weights or another architecture raises :class:`WeightsChangedError`.
        """
        random_weights = self._random_weights
        with fork_rng(torch.device("cpu"), self._torch_seed()):
            weights = None if random_weights else self.weights
            backbone = load_backbone(self.backbone, weights, self.image_size)
        if random_weights is not None:
            backbone.module.load_state_dict(random_weights)
        elif self.weights is None:
            self._random_weights = {k: v.clone() for k, v in backbone.module.state_dict().items()}
        model = backbone.module.eval().requires_grad_(False)
        # From here on layers_ holds module names ("intermediate:N" resolved).
        if self.weights_digest_ is None:  # the first build, in fit: resolve once
            self.layers_ = resolve_layer_names(model, self.layers_, read_by_timm=True)
        self._check_network(model, backbone.source)
        preprocessing = backbone.preprocessing.with_image_size(self.image_size)
        return model.to(self.device_), preprocessing

    def _check_network(self, model: torch.nn.Module, source: str) -> None:
        """Record the network's digests on the first build; verify them on later ones."""
        weights, architecture = state_digest(model.state_dict()), architecture_digest(model)
        if self.weights_digest_ is None:
            self.weights_digest_, self.architecture_digest_ = weights, architecture
            return
        if weights != self.weights_digest_:
            raise WeightsChangedError(
                f"the weights of this fitted FeatureExtractor changed: {source} now holds "
                f"weights of digest {weights}, but the extractor was fitted with weights of "
                f"digest {self.weights_digest_}. Restore the weights it was fitted with, or "
                "fit it again to use these (its features will change)"
            )
        if architecture != self.architecture_digest_:
            raise WeightsChangedError(
                f"the network of this fitted FeatureExtractor is built differently here "
                f"(architecture digest {architecture}, fitted with "
                f"{self.architecture_digest_}): another version of torchvision or timm? "
                "Install the versions it was fitted with, or fit it again"
            )

    def _optimized(self, model: torch.nn.Module, preprocessing: Preprocessing) -> torch.nn.Module:
        """Rewrite the float network for inference at ``precision_``.

        At int8, the network is quantized with the calibration statistics once ``fit``
        has gathered them.
        """
        if self.precision_ == torch.qint8:  # PyTorch's quantization fuses on its own
            return self._quantized(model, preprocessing, self._int8_calibration)
        model = optimize_for_inference(
            model, self.device_, self.precision_, keep=frozenset(self.layers_)
        )
        return model.to(self.device_, memory_format=torch.channels_last)

    def _calibrate(self, model: torch.nn.Module, source) -> tuple[dict, torch.nn.Module]:
        """Calibrate on up to ``calibration_size`` images of ``source``.

        The images, spread evenly over ``source``, go through the float network with
        observers; returns what calibration learned and the int8 network.
        """
        count = min(len(source), self.calibration_size)
        indices = np.unique(np.linspace(0, len(source) - 1, count).round().astype(int))
        prepared = self._prepared(model, self.preprocessing_)
        batches = self._input_batches(source, indices, dtype=torch.float32)
        # contiguous: the histogram observers are slower on channels_last tensors
        calibration = _quantize.calibrate(prepared, (batch.contiguous() for batch in batches))
        return calibration, _quantize.convert(prepared)

    def _quantized(self, model, preprocessing, calibration) -> torch.nn.Module:
        """Rebuild the int8 network from the float one and what calibration learned."""
        return _quantize.convert(self._prepared(model, preprocessing), calibration)

    def _prepared(self, model, preprocessing) -> _quantize.QuantizableGraph:
        """Return the float network's tapped graph with observers, for this input size."""
        crop = preprocessing.crop_size
        graph = _quantize.tapped_graph(model, self.layers_)
        return _quantize.prepare(graph, torch.zeros(1, 3, crop, crop))

    def transform(self, X):
        """Features of each image.

        Parameters
        ----------
        X : images
            An array ``(n, H, W)``, ``(n, H, W, 1)`` or ``(n, H, W, 3)`` (uint8 or
            float), flat rows ``(n, H*W)`` with ``image_shape``, a list of image
            file paths, PIL images or arrays of any sizes, or a ``dask.array`` of
            any of the array forms, chunked along n.

        Returns
        -------
        features : ndarray of shape (n, ``n_features_out_``), float32
            For a ``dask.array``, a lazy ``dask.array`` with the row chunks of ``X``
            (see :func:`skdeep.dask.transform_array`).
        """
        self._check_fitted()
        if is_dask_array(X):
            from .dask import transform_array  # the scale-out module, only where it is used

            return transform_array(self, X)
        source = self._image_source(X)
        cache = self._feature_cache()
        if cache is None:
            return self._extract(source)
        fingerprints = source.fingerprints()
        features, missing = cache.lookup(fingerprints, self.n_features_out_)
        if len(missing):
            computed = self._extract(source, missing)
            features[missing] = computed
            cache.store([fingerprints[i] for i in missing], computed)
        return features

    def fit_transform(self, X, y=None):
        """Fit, then transform ``X`` (validated once)."""
        self._validate_params()
        source = self._image_source(X)
        return self.fit(source).transform(source)

    def _extract(self, source, indices=None) -> np.ndarray:
        """Features of the images at ``indices`` (all: None)."""
        return self._pooled_features(
            source,
            self.model_,
            self.layers_,
            self.pooling,
            indices,
            self._stop_layer,
            layouts=self.layouts_,
        )

    def _feature_cache(self) -> FeatureCache | None:
        """Return the per-image cache, keyed by the settings this transform runs with now."""
        memory = check_memory(self.memory)
        if memory.location is None:
            return None
        return FeatureCache(memory.location, identity_digest(feature_identity(self)))

    def get_feature_names_out(self, input_features=None):
        """Names of the output columns, e.g. ``layer4_avg_0`` or ``penultimate_0``.

        Parameters
        ----------
        input_features : ignored
            Present for scikit-learn compatibility (images have no input names).

        Returns
        -------
        ndarray of str
        """
        self._check_fitted()
        return self.feature_names_out_.copy()

    def __sklearn_tags__(self):
        """Declare image input (3-D arrays) and float32 output."""
        tags = super().__sklearn_tags__()
        tags.input_tags.three_d_array = True
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags


def _same(a, b) -> bool:
    """Whether two parameter values are the same: modules by identity, the rest by value."""
    if isinstance(a, torch.nn.Module) or isinstance(b, torch.nn.Module):
        return a is b
    try:
        return bool(a == b)
    except Exception:  # values that cannot be compared (arrays of several values)
        return a is b
