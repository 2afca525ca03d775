"""timm backbones: ``backbone="timm:<architecture>[.<pretrained tag>]"``.

``pip install "skdeep[timm]"`` brings timm. Names are timm's own, with an optional
pretrained tag: ``"timm:convnext_tiny"``, ``"timm:convnext_tiny.fb_in22k"``,
``"timm:vit_small_patch14_dinov2.lvd142m"``. Weights:

- ``None``: random initialisation;
- a file path: a ``state_dict`` of that architecture;
- ``"DEFAULT"`` (or the estimators' default ``"IMAGENET1K_V1"``): the pretrained
  weights of the tag (timm's default tag when the name has none), looked for in the
  Hugging Face and torch hub caches, then downloaded. Offline without a copy,
  :class:`~skdeep.WeightsUnavailableError` says how to get the file.

Preprocessing (input size, resize ratio, interpolation, mean, std) comes from timm's
data configuration of those weights. Transformers (ViT, Swin) are built for
``image_size`` when it is given (timm resamples their position embeddings).
"""

from __future__ import annotations

import difflib
import math
import os

from torch import nn

from ._compat import optional_import
from ._preprocess import Preprocessing
from ._weights import WeightsUnavailableError, load_weights_file, looks_like_path

PREFIX = "timm:"
PRETRAINED_NAMES = ("DEFAULT", "IMAGENET1K_V1")
INTERMEDIATE = "intermediate:"


def _timm():
    return optional_import("timm", "timm backbones", "timm")


def check_name(name: str) -> None:
    """Raise a ValueError, with close matches, for an unknown timm architecture."""
    timm = _timm()
    architecture = name.partition(".")[0]
    if not timm.is_model(architecture):
        close = difflib.get_close_matches(architecture, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"backbone={PREFIX + name!r} is not a timm model{hint} (timm.list_models() lists them)"
        )


def load(name: str, weights, image_size: int | None) -> tuple[nn.Module, Preprocessing, str]:
    """Build the timm network ``name`` with ``weights``.

    Returns the network, its preprocessing and where its weights came from.

    Raises
    ------
    ValueError
        Unknown architecture, or a weights name other than ``"DEFAULT"``.
    WeightsUnavailableError
        The pretrained weights are neither cached nor downloadable.
    """
    timm = _timm()
    check_name(name)
    if weights is None or looks_like_path(weights):
        module = _create(timm, name, image_size, pretrained=False)
        source = "random initialisation"
        if weights is not None:
            load_weights_file(module, weights, PREFIX + name)
            source = f"the file {os.fspath(weights)!r}"
    elif weights in PRETRAINED_NAMES:
        module, source = _pretrained(timm, name, image_size)
    else:
        raise ValueError(
            f"weights={weights!r} is not a file, and a timm backbone takes no weights "
            f"name: the tag in the name picks them (backbone='{PREFIX}{name}.<tag>'); use "
            "weights='DEFAULT' for the tag's pretrained weights, a state_dict file, or None"
        )
    config = timm.data.resolve_data_config({}, model=module)
    return module, preprocessing(config), source


def _create(timm, name: str, image_size: int | None, pretrained: bool, **options) -> nn.Module:
    """Create the model, built for ``image_size`` when the architecture takes one."""
    if image_size is not None:
        try:
            return timm.create_model(name, pretrained=pretrained, img_size=image_size, **options)
        except TypeError:  # CNNs take any input size and have no img_size argument
            pass
    return timm.create_model(name, pretrained=pretrained, **options)


def _pretrained(timm, name: str, image_size: int | None) -> tuple[nn.Module, str]:
    cached = _cached_file(timm, name)
    options = {"pretrained_cfg_overlay": {"file": cached}} if cached else {}
    source = f"the pretrained weights of {PREFIX}{name} " + (
        f"in {cached}" if cached else "from the Hugging Face hub"
    )
    try:
        return _create(timm, name, image_size, pretrained=True, **options), source
    except Exception as exc:  # huggingface_hub and urllib errors, timeouts, ...
        raise WeightsUnavailableError(
            f"Could not load the pretrained weights of {PREFIX}{name}: they are not in the "
            f"Hugging Face cache ({_hub_cache()}) and the download failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). On a "
            f'machine that is online, run python -c "import timm; timm.create_model('
            f"'{name}', pretrained=True)\" and copy its cache here, or save the model's "
            "state_dict and pass weights='path/to/file.pth'. weights=None gives random "
            "initialisation."
        ) from exc


def _cached_file(timm, name: str) -> str | None:
    """Find the tag's weights in the Hugging Face cache without touching the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    config = timm.models.get_pretrained_cfg(name) or timm.models.get_pretrained_cfg(
        name.partition(".")[0]
    )
    repository = getattr(config, "hf_hub_id", None) if config is not None else None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repository, filename) if repository else None
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def _hub_cache() -> str:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:
        return "~/.cache/huggingface/hub"
    return HF_HUB_CACHE


def preprocessing(config: dict) -> Preprocessing:
    """Translate timm's data configuration into skdeep's preprocessing."""
    crop = int(config["input_size"][-1])
    crop_pct = float(config.get("crop_pct") or 1.0)
    return Preprocessing(
        resize_size=math.floor(crop / crop_pct),
        crop_size=crop,
        mean=tuple(float(v) for v in config["mean"]),
        std=tuple(float(v) for v in config["std"]),
        interpolation=config.get("interpolation", "bicubic"),
    )


def is_timm_model(module: nn.Module) -> bool:
    """Whether ``module`` is a timm model (its class comes from timm)."""
    return type(module).__module__.startswith("timm.")


def intermediate_index(module: nn.Module, layer: str, argument: str = "layers") -> int:
    """Return the index, from 0, of timm's intermediate feature ``"intermediate:N"``.

    N counts the entries of the model's ``feature_info`` (negative from the end), as
    timm's ``forward_intermediates(indices=...)`` and ``out_indices`` do: the blocks of
    a vision transformer, the stages of a CNN.

    Raises
    ------
    ValueError
        N is not an integer or out of range, or the model lists no intermediates.
    """
    text = layer[len(INTERMEDIATE) :]
    try:
        index = int(text)
    except ValueError:
        raise ValueError(
            f"{argument}: {layer!r} must end with an integer index, as in "
            f"'{INTERMEDIATE}-1' (the last block or stage); got {text!r}"
        ) from None
    info = getattr(module, "feature_info", None)
    if not isinstance(info, list) or not all(isinstance(i, dict) for i in info):
        raise ValueError(
            f"{argument}: {layer!r} counts the intermediate features that timm models "
            f"list in feature_info, and this {type(module).__name__} lists none; name a "
            "module instead (see dict(model.named_modules()))"
        )
    if not -len(info) <= index < len(info):
        raise ValueError(
            f"{argument}: {layer!r} is out of range: this {type(module).__name__} has "
            f"{len(info)} intermediate features, so N runs from {-len(info)} to "
            f"{len(info) - 1} ({', '.join(str(entry.get('module')) for entry in info)})"
        )
    return index % len(info)


def intermediate_module(
    module: nn.Module, layer: str, argument: str = "layers", read_by_timm: bool = False
) -> str:
    """Name what reads timm's intermediate feature ``"intermediate:N"``.

    The module that timm's ``feature_info`` lists for it, whose output a hook sees.
    Where the model has no module of that name, ``"intermediate:K"`` (K the index from
    0) when ``read_by_timm``: the feature is then read through the model's own
    ``forward_intermediates`` (see :class:`skdeep._taps.LayerTaps`).

    Raises
    ------
    ValueError
        A bad index (see :func:`intermediate_index`), or no module of that name and not
        ``read_by_timm``.
    """
    index = intermediate_index(module, layer, argument)
    name = module.feature_info[index].get("module")
    if name in dict(module.named_modules()):
        return name
    if read_by_timm and hasattr(module, "forward_intermediates"):
        return f"{INTERMEDIATE}{index}"
    raise ValueError(
        f"{argument}: {layer!r} is the module {name!r} in timm's feature_info of this "
        f"{type(module).__name__}, but the model has no module of that name; tap a "
        "module by its name instead (see dict(model.named_modules()))"
    )


def read_by_timm(layer: str) -> int | None:
    """Return the index of a layer read by ``forward_intermediates`` (None: a hooked one)."""
    if layer.startswith(INTERMEDIATE) and layer[len(INTERMEDIATE) :].isdigit():
        return int(layer[len(INTERMEDIATE) :])
    return None


def intermediate_means(model: nn.Module, index: int, inputs) -> object:
    """Return the spatial mean of ``forward_intermediates`` output ``index`` on ``inputs``.

    Returns rows ``(B, C)``, or None where timm gives no map or token sequence.
    """
    import torch

    with torch.inference_mode():
        (output,) = model.forward_intermediates(inputs, indices=[index], intermediates_only=True)
    if not isinstance(output, torch.Tensor) or output.ndim not in (3, 4):
        return None
    return output.float().mean((2, 3) if output.ndim == 4 else 1)


def classifier_names(module: nn.Module) -> list[str] | None:
    """Name the classifier head(s) of a timm model, as its ``pretrained_cfg`` does.

    Distilled models (DeiT, LeViT) have two: ``("head", "head_dist")``. None for
    modules that are not timm models, or whose configuration names no existing module.
    """
    if not is_timm_model(module):
        return None
    config = getattr(module, "pretrained_cfg", None) or {}
    names = config.get("classifier") if isinstance(config, dict) else None
    names = [names] if isinstance(names, str) else list(names or [])
    modules = dict(module.named_modules())
    if not names or not all(name in modules for name in names):
        return None
    return names


def has_timm_head(module: nn.Module) -> bool:
    """Whether ``module`` is a timm model with timm's ``forward_features`` and ``forward_head``."""
    return (
        is_timm_model(module)
        and hasattr(module, "forward_features")
        and hasattr(module, "forward_head")
    )


def check_forward(model: nn.Module, inputs, argument: str = "layers") -> None:
    """Check that ``model(x)`` is ``forward_head(forward_features(x))`` on ``inputs``.

    skdeep reads a timm model's pre-logits (``"penultimate"``) and logits through
    timm's own ``forward_features`` and ``forward_head``; that is the model's output
    only where its forward is those two.

    Raises
    ------
    ValueError
        The two differ.
    """
    import torch

    if not has_timm_head(model):
        return
    with torch.inference_mode():
        direct = model(inputs)
        split = model.forward_head(model.forward_features(inputs))
    same = (
        isinstance(direct, torch.Tensor)
        and isinstance(split, torch.Tensor)
        and direct.shape == split.shape
        and torch.allclose(direct.float(), split.float(), 1e-4, 1e-5)
    )
    if not same:
        raise ValueError(
            f"{argument}: skdeep reads the 'penultimate' and 'logits' of timm models with "
            f"timm's forward_features and forward_head, but this {type(model).__name__}'s "
            "forward computes something else; tap a module by name instead (see "
            "dict(model.named_modules()))"
        )


def replace_head(module: nn.Module, n_outputs: int) -> str | None:
    """Give a timm model a new head with timm's ``reset_classifier``; return its name.

    The first of :func:`classifier_names` (distilled models get both of theirs
    replaced). Returns None for modules that are not timm models.
    """
    if not (is_timm_model(module) and hasattr(module, "reset_classifier")):
        return None
    module.reset_classifier(n_outputs)
    names = classifier_names(module) or ["head"]
    for name in names:
        if not isinstance(module.get_submodule(name), (nn.Linear, nn.Conv2d)):
            raise ValueError(f"the timm model's classifier {name!r} is not a linear layer")
    return names[0]
