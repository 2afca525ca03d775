"""
A folder of images to a feature store on a Dask cluster
=======================================================

The 5,000 MNIST digits are written as PNG files into one sub-folder per class, as photos
usually arrive. :func:`skdeep.dask.extract` runs the ImageNet MobileNet-V2 over them on a
local cluster of two single-threaded workers and writes ``features.zarr`` chunk by
chunk; a second call finds every chunk written and computes nothing. A logistic
regression is then trained from the store, which :func:`skdeep.load_features` opens as a
lazy Dask array. The same run from the command line::

    python -m skdeep extract digits/ --image-size 64 --out features.zarr --workers 2

Run:  ``.venv/bin/python examples/dask_extraction.py`` (about a minute; needs
``skdeep[dask]``). It draws no picture.
"""

import tempfile
import time
from pathlib import Path

import numpy as np
from distributed import Client
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skdeep import FeatureExtractor, load_features
from skdeep import dask as skdeep_dask
from skdeep.__main__ import find_images
from skdeep.datasets import load_mnist_5k

# %%
# Image files, one folder per class
# ---------------------------------


def write_digits(folder: Path) -> None:
    """Write the MNIST 5k digits as PNG files, one sub-folder per class."""
    images, labels = load_mnist_5k()
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        path = folder / str(label) / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)


# %%
# Extraction on a local cluster
# -----------------------------
#
# :func:`skdeep.dask.local_cluster` starts what ``--workers 2`` starts. Each worker
# builds the network once and reuses it for every partition it gets; each partition
# becomes one chunk of the store, written atomically.


def extract(folder: Path, out: Path) -> None:
    """Extract the features of every file under ``folder`` into the store ``out``."""
    paths, labels = find_images(str(folder))  # labels: the sub-folder names
    extractor = FeatureExtractor("mobilenet_v2", image_size=64)  # ImageNet weights
    cluster = skdeep_dask.local_cluster(n_workers=2)  # on 127.0.0.1
    with cluster, Client(cluster) as client:
        start = time.perf_counter()
        skdeep_dask.extract(extractor, paths, out, labels=labels, client=client)
        print(f"extracted {len(paths)} images in {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        skdeep_dask.extract(extractor, paths, out, labels=labels, client=client)
        print(f"second run (nothing missing): {time.perf_counter() - start:.1f} s")


# %%
# A classifier trained from the store
# -----------------------------------


def train_from(out: Path) -> None:
    """Train and score a logistic regression on the stored features."""
    store = load_features(out)
    print(f"store: {store['features']!r}")
    X, y = np.asarray(store["features"]), store["labels"]
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=1000, stratify=y, random_state=0
    )
    classifier = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=500))
    accuracy = classifier.fit(X_train, y_train).score(X_test, y_test)
    print(f"logistic regression on the stored features: test accuracy {accuracy:.3f}")


# %%
# The run
# -------
#
# The cluster's worker processes import this script again, so the work stands under
# ``if __name__ == "__main__":``.

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as work:
        folder, out = Path(work) / "digits", Path(work) / "features.zarr"
        write_digits(folder)
        extract(folder, out)
        train_from(out)
