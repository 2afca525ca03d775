"""skdeep: deep transfer learning with a scikit-learn face.

- :class:`FeatureExtractor`: frozen pretrained CNN features for scikit-learn pipelines.
- :class:`FineTuneClassifier`: fine-tunes a pretrained CNN on your images in ``fit``.
- :class:`DomainAdaptedClassifier`: fine-tuning with an MMD penalty (DDC / DAN) that
  carries a model trained on labeled source images over to unlabeled target images.
"""

from ._store import load_features
from ._version import __version__
from ._weights import WeightsChangedError, WeightsUnavailableError
from .domain_adaptation import DomainAdaptedClassifier
from .feature_extraction import FeatureExtractor
from .fine_tuning import FineTuneClassifier

__all__ = [
    "DomainAdaptedClassifier",
    "FeatureExtractor",
    "FineTuneClassifier",
    "WeightsChangedError",
    "WeightsUnavailableError",
    "__version__",
    "load_features",
]
