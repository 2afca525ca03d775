"""Domain adaptation in a few lines: MNIST (labeled) -> optdigits (unlabeled).

Run:  .venv/bin/python examples/domain_adaptation.py

A network fine-tuned on MNIST digits does poorly on scikit-learn's 8x8 optdigits,
whose thick, blurry strokes are another domain. DomainAdaptedClassifier sees the
optdigits images too, without their labels, and pulls the features of both domains
together with an MMD penalty (Deep Adaptation Network). The optdigits labels are used
only to score.
"""

import numpy as np

from skdeep import DomainAdaptedClassifier, FineTuneClassifier
from skdeep.datasets import load_digits_images, load_mnist_5k

X_source, y_source = load_mnist_5k()  # 5,000 MNIST digits, 28x28
X_target, y_target = load_digits_images(size=28)  # 1,797 optdigits, brought to 28x28

settings = dict(image_size=32, max_epochs=2, augment="crop", random_state=0)

source_only = FineTuneClassifier(**settings).fit(X_source, y_source)

# Target rows travel with the source rows; y == -1 marks them as unlabeled.
X = np.concatenate([X_source, X_target])
y = np.concatenate([y_source, np.full(len(X_target), -1)])
adapted = DomainAdaptedClassifier(**settings).fit(X, y)

print(f"target accuracy, trained on the source only: {source_only.score(X_target, y_target):.3f}")
print(f"target accuracy, adapted to the target:      {adapted.score(X_target, y_target):.3f}")
