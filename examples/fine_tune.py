"""
Fine-tuning a pretrained network
================================

:class:`~skdeep.FineTuneClassifier` fine-tunes an ImageNet ResNet-18 on CIFAR-10 when
torchvision can download both, or the offline MobileNet-V2 weights on MNIST 5k when
not. Either way the script prints the training history and the test accuracy, and draws
the history to ``examples/images/training_history.png``.

Run:  ``.venv/bin/python examples/fine_tune.py [--n-train 10000] [--epochs 3]`` (a few
minutes on a CPU; a GPU is picked up automatically).
"""

# sphinx_gallery_thumbnail_path = '../examples/images/training_history.png'

import argparse
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from skdeep import FineTuneClassifier, TrainingHistoryDisplay, WeightsUnavailableError
from skdeep.backbones import load_backbone
from skdeep.datasets import DatasetUnavailableError, load_cifar10, load_mnist_5k

# The gallery runs an example from its own folder, without __file__.
HERE = Path(__file__).parent if "__file__" in globals() else Path.cwd()

parser = argparse.ArgumentParser(description="Fine-tune a pretrained network.")
parser.add_argument("--n-train", type=int, default=10_000)
parser.add_argument("--n-test", type=int, default=2_000)
parser.add_argument("--epochs", type=int, default=3)
args = parser.parse_args()

# %%
# The data: CIFAR-10 online, MNIST offline
# ----------------------------------------
#
# Online, CIFAR-10 and the ResNet-18 weights come through torchvision's downloaders (a
# random subset keeps a CPU run short). Offline, :func:`~skdeep.datasets.load_cifar10`
# raises :class:`~skdeep.datasets.DatasetUnavailableError` (or the weights
# :class:`~skdeep.WeightsUnavailableError`), and the script fine-tunes MobileNet-V2 on
# MNIST instead, with random crops only: digits must not be mirrored.


def cifar10(n_train: int, n_test: int):
    """Load a random subset of CIFAR-10 and the ResNet-18 settings, or None when offline."""
    try:
        X_train, y_train = load_cifar10(train=True)
        X_test, y_test = load_cifar10(train=False)
        load_backbone("resnet18", "IMAGENET1K_V1")  # fails early when the weights can't come
    except (DatasetUnavailableError, WeightsUnavailableError) as exc:
        print(f"Offline ({type(exc).__name__}): fine-tuning on MNIST 5k instead.\n")
        return None
    rng = np.random.default_rng(0)
    train = rng.choice(len(X_train), min(n_train, len(X_train)), replace=False)
    test = rng.choice(len(X_test), min(n_test, len(X_test)), replace=False)
    settings = dict(backbone="resnet18", image_size=64, augment=True)
    return "CIFAR-10", settings, X_train[train], X_test[test], y_train[train], y_test[test]


def mnist():
    """Load MNIST 5k (4,000 train, 1,000 test) and the MobileNet-V2 settings."""
    images, labels = load_mnist_5k()
    split = train_test_split(images, labels, test_size=1000, stratify=labels, random_state=0)
    return "MNIST 5k", dict(backbone="mobilenet_v2", image_size=48, augment="crop"), *split


name, settings, X_train, X_test, y_train, y_test = cifar10(args.n_train, args.n_test) or mnist()

# %%
# Fine-tuning
# -----------
#
# ``early_stopping=True`` holds out a tenth of the training images and keeps the weights
# of the best validation epoch; ``verbose=True`` shows a progress bar per epoch.

clf = FineTuneClassifier(
    **settings, max_epochs=args.epochs, early_stopping=True, random_state=0, verbose=True
)
print(f"{name}: fine-tuning {settings['backbone']} on {len(X_train)} images")
clf.fit(X_train, y_train)

# %%
# The history, and the test accuracy
# ----------------------------------
#
# ``history_`` holds one record per epoch; :class:`~skdeep.TrainingHistoryDisplay`
# draws it.

print("\n| epoch | train loss | train accuracy | learning rate | seconds |")
print("|-------|------------|----------------|---------------|---------|")
for record in clf.history_:
    print(
        f"| {record['epoch']:5d} | {record['train_loss']:10.4f} | "
        f"{record['train_accuracy']:14.3f} | {record['lr']:13.2e} | {record['seconds']:7.1f} |"
    )
print(f"\n{name} test accuracy: {clf.score(X_test, y_test):.3f} ({len(X_test)} images)")
picture = HERE / "images" / "training_history.png"
picture.parent.mkdir(exist_ok=True)
TrainingHistoryDisplay.from_estimator(clf).figure_.savefig(picture, dpi=100, bbox_inches="tight")
print(f"drew {picture}")

# %%
# The picture this script drew when it was last run (the documentation build does not
# run this example):
#
# .. image:: /../examples/images/training_history.png
#    :alt: Training loss, validation accuracy and learning rate per epoch
