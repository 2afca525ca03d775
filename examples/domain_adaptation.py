"""
Domain adaptation: MNIST (labeled) to optdigits (unlabeled)
===========================================================

A network fine-tuned on MNIST digits does poorly on scikit-learn's 8x8 optdigits, whose
thick, blurry strokes are another domain. :class:`~skdeep.DomainAdaptedClassifier` sees
the optdigits images too, without their labels, and pulls the features of both domains
together (an MMD penalty, as in the Deep Adaptation Network), while a class-confusion
loss asks its optdigits predictions not to mix classes. The optdigits labels are used
only to score, and to mark the points of the pictures.

Run:  ``.venv/bin/python examples/domain_adaptation.py`` (a few minutes on a CPU); it
draws ``examples/images/domain_alignment.png`` and
``examples/images/adaptation_history.png``.
"""

# sphinx_gallery_thumbnail_path = '../examples/images/domain_alignment.png'

from pathlib import Path

import numpy as np

from skdeep import (
    DomainAdaptedClassifier,
    DomainAlignmentDisplay,
    FineTuneClassifier,
    TrainingHistoryDisplay,
)
from skdeep.datasets import load_digits_images, load_mnist_5k

# The gallery runs an example from its own folder, without __file__.
HERE = Path(__file__).parent if "__file__" in globals() else Path.cwd()
PICTURES = HERE / "images"

# %%
# Two domains
# -----------
#
# 5,000 MNIST digits (28x28) are the labeled source; scikit-learn's 1,797 optdigits,
# brought to 28x28 by :func:`~skdeep.datasets.load_digits_images`, are the target.

X_source, y_source = load_mnist_5k()
X_target, y_target = load_digits_images(size=28)
settings = dict(image_size=32, max_epochs=4, random_state=0)

# %%
# Without adaptation
# ------------------
#
# The same network fine-tuned on the source alone.

source_only = FineTuneClassifier(**settings).fit(X_source, y_source)

# %%
# With adaptation
# ---------------
#
# Target rows travel with the source rows; ``y == -1`` marks them as unlabeled, so a
# ``Pipeline`` or a cross-validation keeps them aligned.

X = np.concatenate([X_source, X_target])
y = np.concatenate([y_source, np.full(len(X_target), -1)])
adapted = DomainAdaptedClassifier(**settings).fit(X, y)

print(f"target accuracy, trained on the source only: {source_only.score(X_target, y_target):.3f}")
print(f"target accuracy, adapted to the target:      {adapted.score(X_target, y_target):.3f}")

# %%
# The features of both domains, before and after
# ----------------------------------------------
#
# :class:`~skdeep.DomainAlignmentDisplay` projects the penultimate features of 600
# images of each domain to two dimensions, for both models; the training curves show the
# divergence falling as the penalty ramps up.

PICTURES.mkdir(exist_ok=True)
shown = np.random.default_rng(0).choice(len(X_source), 600, replace=False)
display = DomainAlignmentDisplay.from_estimator(
    adapted, X_source[shown], X_target[:600], y_source[shown], y_target[:600],
    source_only=source_only,
)  # fmt: skip
display.figure_.suptitle("MNIST (source) and optdigits (target) features, PCA", y=1.04)
display.figure_.savefig(PICTURES / "domain_alignment.png", dpi=100, bbox_inches="tight")
history = TrainingHistoryDisplay.from_estimator(adapted)
history.figure_.savefig(PICTURES / "adaptation_history.png", dpi=100, bbox_inches="tight")
print(f"drew {PICTURES / 'domain_alignment.png'} and {PICTURES / 'adaptation_history.png'}")

# %%
# The pictures this script drew when it was last run (the documentation build does not
# run this example):
#
# .. image:: /../examples/images/domain_alignment.png
#    :alt: Source and target features before and after adaptation
#
# .. image:: /../examples/images/adaptation_history.png
#    :alt: Training curves of the adapted model
