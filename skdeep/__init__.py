"""skdeep: deep transfer learning with a scikit-learn face.

- :class:`FeatureExtractor`: frozen pretrained CNN features for scikit-learn pipelines.
- :class:`FineTuneClassifier`: fine-tunes a pretrained CNN on your images in ``fit``.
"""

__version__ = "0.1.0"

from .backbones import WeightsUnavailableError  # noqa: E402
from .feature_extraction import FeatureExtractor  # noqa: E402
from .fine_tuning import FineTuneClassifier  # noqa: E402

__all__ = ["FeatureExtractor", "FineTuneClassifier", "WeightsUnavailableError", "__version__"]
