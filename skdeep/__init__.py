"""skdeep: deep transfer learning with a scikit-learn face.

- :class:`FeatureExtractor`: frozen pretrained CNN features for scikit-learn pipelines.
"""

__version__ = "0.1.0"

from .backbones import WeightsUnavailableError  # noqa: E402
from .feature_extraction import FeatureExtractor  # noqa: E402

__all__ = ["FeatureExtractor", "WeightsUnavailableError", "__version__"]
