"""skdeep: deep transfer learning with a scikit-learn face.

- :class:`FeatureExtractor`: frozen pretrained CNN features for scikit-learn pipelines.
- :class:`FineTuneClassifier`: fine-tunes a pretrained CNN on your images in ``fit``.
- :class:`DomainAdaptedClassifier`: fine-tuning with an MMD penalty (DDC / DAN) that
  carries a model trained on labeled source images over to unlabeled target images.
"""

__version__ = "0.1.0"

from .backbones import WeightsUnavailableError  # noqa: E402
from .domain_adaptation import DomainAdaptedClassifier  # noqa: E402
from .feature_extraction import FeatureExtractor  # noqa: E402
from .fine_tuning import FineTuneClassifier  # noqa: E402

__all__ = [
    "DomainAdaptedClassifier",
    "FeatureExtractor",
    "FineTuneClassifier",
    "WeightsUnavailableError",
    "__version__",
]
