"""skdeep: deep transfer learning with a scikit-learn face.

- :class:`FeatureExtractor`: frozen pretrained CNN features for scikit-learn pipelines.
- :class:`FineTuneClassifier`: fine-tunes a pretrained CNN on your images in ``fit``.
- :class:`DomainAdaptedClassifier`: fine-tuning with a divergence penalty (DAN, Deep
  CORAL, DANN) that carries a model trained on labeled source images over to unlabeled
  target images.

``import skdeep`` is quick: the names below, and the subpackages ``skdeep.dask``,
``skdeep.datasets``, ``skdeep.metrics``, ``skdeep.losses`` and ``skdeep.backbones``, are
imported (with torch, torchvision and scikit-learn) when first used, as SciPy and
scikit-image do for theirs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__

# Public name -> the module that defines it, imported on first use.
_LAZY_NAMES = {
    "DomainAdaptedClassifier": "domain_adaptation",
    "DomainAlignmentDisplay": "_display",
    "FeatureExtractor": "feature_extraction",
    "FineTuneClassifier": "fine_tuning",
    "LayerProbeDisplay": "_display",
    "TrainingHistoryDisplay": "_display",
    "WeightsChangedError": "_weights",
    "WeightsUnavailableError": "_weights",
    "layer_probe_scores": "_display",
    "load_features": "_store",
}
_SUBMODULES = ("backbones", "dask", "datasets", "losses", "metrics")

__all__ = [  # written out, so that linters and IDEs read it: a test keeps it complete
    "DomainAdaptedClassifier",
    "DomainAlignmentDisplay",
    "FeatureExtractor",
    "FineTuneClassifier",
    "LayerProbeDisplay",
    "TrainingHistoryDisplay",
    "WeightsChangedError",
    "WeightsUnavailableError",
    "__version__",
    "backbones",
    "dask",
    "datasets",
    "layer_probe_scores",
    "load_features",
    "losses",
    "metrics",
]


def __getattr__(name: str):
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers and IDEs see
    from . import backbones, dask, datasets, losses, metrics
    from ._display import (
        DomainAlignmentDisplay,
        LayerProbeDisplay,
        TrainingHistoryDisplay,
        layer_probe_scores,
    )
    from ._store import load_features
    from ._weights import WeightsChangedError, WeightsUnavailableError
    from .domain_adaptation import DomainAdaptedClassifier
    from .feature_extraction import FeatureExtractor
    from .fine_tuning import FineTuneClassifier
