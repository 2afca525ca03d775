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


def intermediate_module(module: nn.Module, layer: str, argument: str = "layers") -> str:
    """Name the module behind timm's intermediate feature ``"intermediate:N"``.

    N counts the entries of the model's ``feature_info`` (negative from the end), as
    timm's ``forward_intermediates(indices=...)`` and ``out_indices`` do: the blocks of
    a vision transformer, the stages of a CNN. The hook on that module sees the
    tensor ``forward_intermediates`` returns before its optional norm and reshaping.

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
            f"{len(info) - 1} ({', '.join(entry['module'] for entry in info)})"
        )
    name = info[index]["module"]
    if name not in dict(module.named_modules()):
        raise ValueError(
            f"{argument}: {layer!r} is the module {name!r} in timm's feature_info of this "
            f"{type(module).__name__}, but the model has no module of that name; tap a "
            "module by its name instead (see dict(model.named_modules()))"
        )
    return name


def check_intermediates(
    model: nn.Module,
    requested: list[str],
    resolved: list[str],
    pooled: dict,
    probe_input,
    argument: str = "layers",
) -> None:
    """Check that hooked ``"intermediate:N"`` taps are what ``forward_intermediates`` returns.

    skdeep reads an intermediate through a hook on the module timm's ``feature_info``
    names; timm's own ``forward_intermediates`` may transform that output (a norm, a
    reshape). Their spatial means must agree on the probe input, else the tap would
    not be the intermediate the user asked for.

    Parameters
    ----------
    model : nn.Module
        The timm model (float32, eval mode).
    requested, resolved : list of str
        The layers as asked for and as module names, in the same order.
    pooled : dict
        The average-pooled rows ``(B, C)`` skdeep computes for each resolved layer on
        ``probe_input``.
    probe_input : tensor
        The input those rows were computed on.

    Raises
    ------
    ValueError
        A tap disagrees with ``forward_intermediates``.
    """
    import torch

    wanted = {
        int(layer[len(INTERMEDIATE) :]) % len(model.feature_info): name
        for layer, name in zip(requested, resolved, strict=True)
        if layer.startswith(INTERMEDIATE)
    }
    if not wanted or not hasattr(model, "forward_intermediates"):
        return
    indices = sorted(wanted)
    with torch.inference_mode():
        outputs = model.forward_intermediates(probe_input, indices=indices, intermediates_only=True)
    for index, output in zip(indices, outputs, strict=True):
        name = wanted[index]
        if isinstance(output, (tuple, list)) or output.ndim not in (3, 4):
            continue  # nothing to compare a mean with
        expected = output.float().mean((2, 3) if output.ndim == 4 else 1)
        ours = pooled[name].float()
        if ours.shape != expected.shape or not torch.allclose(ours, expected, 1e-3, 1e-4):
            raise ValueError(
                f"{argument}: 'intermediate:{index}' is the module {name!r} of timm's "
                f"feature_info, but timm's forward_intermediates returns something else "
                f"for it (a norm or another transform of that output), so skdeep cannot tap "
                f"it with a hook; tap {name!r} by name for the module's own output"
            )


def replace_head(module: nn.Module, n_outputs: int) -> str | None:
    """Give a timm model a new head with timm's ``reset_classifier``; return its name.

    Returns None for modules that are not timm models.
    """
    if not (type(module).__module__.startswith("timm.") and hasattr(module, "reset_classifier")):
        return None
    module.reset_classifier(n_outputs)
    names = module.pretrained_cfg.get("classifier") or "head"
    name = names[0] if isinstance(names, (list, tuple)) else names
    if not isinstance(module.get_submodule(name), (nn.Linear, nn.Conv2d)):
        raise ValueError(f"the timm model's classifier {name!r} is not a linear layer")
    return name
