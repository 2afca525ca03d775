"""Backbones: build a named network (torchvision or timm) with its weights and preprocessing.

``backbone`` is a torchvision classification model name (:func:`classification_models`
lists them), ``"timm:<name>[.<tag>]"`` for a timm model (see ``skdeep._timm``), or
an ``nn.Module``. Where named weights are looked for, and what happens when they are
nowhere, is the job of ``skdeep._weights``; surgery on the built network (new heads,
stages, layer names), of ``skdeep._network``.
"""

from __future__ import annotations

import copy
import difflib
import os
from dataclasses import dataclass

import torchvision
from torch import nn

from . import _timm
from ._network import backbone_stages, reset_parameters
from ._preprocess import Preprocessing
from ._weights import load_named_weights, load_weights_file, looks_like_path

__all__ = ["Backbone", "backbone_stages", "classification_models", "load_backbone"]

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


@dataclass
class Backbone:
    """A freshly built network, how its input must be prepared, and where its weights came from."""

    module: nn.Module
    preprocessing: Preprocessing
    source: str = "random initialisation"


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
        (see ``skdeep._timm``), or a module (deep-copied, so the caller's module is
        never changed).
    weights : str, path or None
        A torchvision weights name such as ``"IMAGENET1K_V1"`` or ``"DEFAULT"``, the
        path of a ``state_dict`` file, or None for random initialisation. For an
        ``nn.Module`` backbone, a weights name keeps the module's own parameters and
        None draws them again with each layer's ``reset_parameters`` (see
        ``skdeep._network.reset_parameters``), from torch's random generator.
    image_size : int, optional
        The input size; timm transformers are built for it.

    Returns
    -------
    Backbone
        The network, its preprocessing and the source of its weights.
    """
    if isinstance(backbone, nn.Module):
        module = copy.deepcopy(backbone)
        if looks_like_path(weights):
            load_weights_file(module, weights, type(backbone).__name__)
            return Backbone(module, Preprocessing(), f"the file {os.fspath(weights)!r}")
        if weights is None:
            reset_parameters(module)
            return Backbone(module, Preprocessing())
        return Backbone(module, Preprocessing(), "the module's own parameters")
    if not isinstance(backbone, str):
        raise TypeError(
            f"backbone must be a torchvision model name or an nn.Module; "
            f"got {type(backbone).__name__}"
        )
    if backbone.startswith(_timm.PREFIX):
        module, preprocessing, source = _timm.load(
            backbone.removeprefix(_timm.PREFIX), weights, image_size
        )
        return Backbone(module, preprocessing, source)
    _check_model_name(backbone)
    default_weights = _named_weights(backbone, "DEFAULT", required=False)
    if weights is None or looks_like_path(weights):
        kwargs = _RANDOM_BUILDER_KWARGS.get(backbone, {})
        module = torchvision.models.get_model(backbone, weights=None, **kwargs)
        if weights is None:
            return Backbone(module, Preprocessing.from_weights(default_weights))
        load_weights_file(module, weights, backbone)
        source = f"the file {os.fspath(weights)!r}"
        return Backbone(module, Preprocessing.from_weights(default_weights), source)
    enum = _named_weights(backbone, weights, required=True)
    kwargs = {"num_classes": len(enum.meta["categories"])}
    kwargs.update(_PRETRAINED_BUILDER_KWARGS.get(backbone, {}))
    module = torchvision.models.get_model(backbone, weights=None, **kwargs)
    state, location = load_named_weights(enum)
    module.load_state_dict(state)
    return Backbone(module, Preprocessing.from_weights(enum), f"{enum} from {location}")


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
