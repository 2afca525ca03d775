"""Domain adaptation in a few lines: MNIST (labeled) -> optdigits (unlabeled).

Run:  .venv/bin/python examples/domain_adaptation.py

A network fine-tuned on MNIST digits does poorly on scikit-learn's 8x8 optdigits,
whose thick, blurry strokes are another domain. DomainAdaptedClassifier sees the
optdigits images too, without their labels, and pulls the features of both domains
together (an MMD penalty, as in the Deep Adaptation Network), while a class-confusion
loss asks its optdigits predictions not to mix classes. The optdigits labels are
used only to score, and to mark the points of the picture it draws:
``examples/images/domain_alignment.png``, the features of both models projected to two
dimensions, and ``examples/images/adaptation_history.png``, its training curves.
"""

from pathlib import Path

import numpy as np

from skdeep import (
    DomainAdaptedClassifier,
    DomainAlignmentDisplay,
    FineTuneClassifier,
    TrainingHistoryDisplay,
)
from skdeep.datasets import load_digits_images, load_mnist_5k

PICTURES = Path(__file__).parent / "images"


def main() -> None:
    """Fit without and with adaptation; print both target accuracies; draw the features."""
    X_source, y_source = load_mnist_5k()  # 5,000 MNIST digits, 28x28
    X_target, y_target = load_digits_images(size=28)  # 1,797 optdigits, brought to 28x28

    settings = dict(image_size=32, max_epochs=4, random_state=0)
    source_only = FineTuneClassifier(**settings).fit(X_source, y_source)

    # Target rows travel with the source rows; y == -1 marks them as unlabeled.
    X = np.concatenate([X_source, X_target])
    y = np.concatenate([y_source, np.full(len(X_target), -1)])
    adapted = DomainAdaptedClassifier(**settings).fit(X, y)

    print(
        f"target accuracy, trained on the source only: {source_only.score(X_target, y_target):.3f}"
    )
    print(f"target accuracy, adapted to the target:      {adapted.score(X_target, y_target):.3f}")

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


if __name__ == "__main__":
    main()
