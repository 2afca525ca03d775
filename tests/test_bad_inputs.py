"""A catalogue of inputs a user can get wrong, with the error each must give.

Every entry: what the user does, the exception it must raise, and a fragment that the
message's first line must hold (the argument or file it names, what was expected).
Add a row for every bad input found to slip through.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from skdeep import (
    DomainAdaptedClassifier,
    FeatureExtractor,
    FineTuneClassifier,
    WeightsChangedError,
)
from skdeep.__main__ import build_parser, extract
from skdeep._base import _shared_networks
from skdeep._display import (
    DomainAlignmentDisplay,
    LayerProbeDisplay,
    TrainingHistoryDisplay,
    layer_probe_scores,
)
from skdeep.datasets import load_cifar10, load_digits_images, load_mnist_m_like
from skdeep.metrics import PredictionEntropyScorer, SoftNeighborhoodDensityScorer

from .conftest import TinyNet, separable_images


def tiny_adapter(**params):
    """Return a DomainAdaptedClassifier on TinyNet that trains in a moment."""
    defaults = dict(backbone=TinyNet(), image_size=24, max_epochs=1, batch_size=8)
    return DomainAdaptedClassifier(**{**defaults, **params})


def random_resnet(**params):
    """Return a FeatureExtractor on a randomly initialised ResNet-18 at 32 px."""
    return FeatureExtractor("resnet18", weights=None, image_size=32, **params)


def photos(tmp_path, n=6, corrupt=None):
    """PNG files; the one at index ``corrupt`` holds bytes that are not an image."""
    rng = np.random.default_rng(0)
    paths = []
    for index in range(n):
        path = tmp_path / f"photo_{index}.png"
        if index == corrupt:
            path.write_bytes(b"these bytes are not a PNG")
        else:
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def mismatched_weights_file(tmp_path):
    """Load a ResNet-18 checkpoint into MobileNet-V2."""
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return FeatureExtractor("mobilenet_v2", weights=str(path)).fit()


def cli_with_object_array(tmp_path):
    """Run ``python -m skdeep extract`` on a .npy file of Python objects."""
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"not": "an image"}, None], dtype=object), allow_pickle=True)
    args = build_parser().parse_args(["extract", str(path), "--out", str(tmp_path / "f.joblib")])
    return extract(args)


def weights_file_changed_after_fitting(tmp_path):
    """Refit nothing, but replace the weights file an extractor was fitted with."""
    path = tmp_path / "tiny.pth"
    torch.save(TinyNet().state_dict(), path)
    extractor = FeatureExtractor(TinyNet(), weights=str(path), image_size=16).fit()
    data = pickle.dumps(extractor)
    torch.save(TinyNet().state_dict(), path)
    _shared_networks.clear()  # as in another process
    return pickle.loads(data).transform(np.zeros((2, 16, 16), np.uint8))


def store_of_another_npy_file(tmp_path):
    """Resume a feature store with another .npy file of the same length."""
    pytest.importorskip("zarr")
    from skdeep.dask import extract as extract_store

    for name in ("a", "b"):
        np.save(tmp_path / f"{name}.npy", np.zeros((4, 16, 16), np.uint8))
    extractor = FeatureExtractor(TinyNet(), image_size=16).fit()
    out = tmp_path / "f.zarr"
    extract_store(extractor, str(tmp_path / "a.npy"), out, n_workers=0, verbose=False)
    extract_store(extractor, str(tmp_path / "b.npy"), out, n_workers=0, verbose=False)


def cli(tmp_path, *options):
    """Run ``python -m skdeep extract`` on a small .npy file with ``options``."""
    np.save(tmp_path / "images.npy", np.zeros((2, 8, 8), np.uint8))
    argv = ["extract", str(tmp_path / "images.npy"), "--out", str(tmp_path / "f.joblib")]
    return extract(build_parser().parse_args([*argv, *options]))


def adapt_with(divergence):
    """Fit a tiny adapter with a callable ``divergence`` and a constant weight."""
    return tiny_adapter(divergence=divergence, divergence_schedule="constant").fit(
        X_SOURCE, Y_SOURCE, X_target=255 - X_SOURCE
    )


def pairwise(source, target):
    """Return a matrix, not a scalar."""
    return torch.cdist(source, target)


def nothing(source, target):
    """Return None."""


def not_a_number(source, target):
    """Return NaN."""
    return (source.mean() - target.mean()) * float("nan")


def through_numpy(source, target):
    """Return a value computed outside torch: no gradient."""
    return torch.tensor(float(np.abs(source.detach().numpy()).mean()))


def one_argument(rows):
    """Take one argument only."""
    return rows.mean()


class ProbaOnly:
    """An estimator with predict_proba only, for scorer arguments checked before it runs."""

    classes_ = np.array(["horizontal", "vertical"])

    def predict_proba(self, X):
        """Return uniform probabilities."""
        return np.full((len(X), 2), 0.5)


def fitted_tiny_extractor():
    """Return a fitted FeatureExtractor on TinyNet at 24 px."""
    return FeatureExtractor(TinyNet(), image_size=24).fit()


X_SOURCE, Y_SOURCE = separable_images(n_per_class=8, size=24)


@dataclass
class BadInput:
    """One catalogue entry: the call, its exception, a pattern of its first line."""

    name: str
    call: Callable
    error: type
    first_line: str


CATALOGUE = [
    BadInput(
        "weights file of another network",
        mismatched_weights_file,
        ValueError,
        r"weights: the file '.*resnet18.pth' does not fit the backbone mobilenet_v2; "
        r"missing keys \(\d+\): \['features.0.0.weight'",
    ),
    BadInput(
        "image_size too small for the network (extraction)",
        lambda tmp: FeatureExtractor("alexnet", weights=None, image_size=32).fit(),
        ValueError,
        r"image_size: .*32x32 pixels is too small .*smallest size that works is 63",
    ),
    BadInput(
        "image_size too small for the network (fine-tuning)",
        lambda tmp: FineTuneClassifier("squeezenet1_0", weights=None, image_size=16).fit(
            X_SOURCE, Y_SOURCE
        ),
        ValueError,
        r"image_size: .* smallest size that works is 21",
    ),
    BadInput(
        "image_shape with a zero size",
        lambda tmp: random_resnet(image_shape=(0, 64)).fit_transform(np.zeros((2, 0))),
        ValueError,
        r"image_shape must be \(H, W\) or \(H, W, C\) with positive H and W.*got \(0, 64\)",
    ),
    BadInput(
        "image_shape with a negative size",
        lambda tmp: random_resnet(image_shape=(-8, -8)).fit_transform(np.zeros((2, 64))),
        ValueError,
        r"image_shape must be .* got \(-8, -8\)",
    ),
    BadInput(
        "image_shape that is not a shape",
        lambda tmp: random_resnet(image_shape=(8.5, 8)).fit_transform(np.zeros((2, 68))),
        ValueError,
        "image_shape must be",
    ),
    BadInput(
        "X_target of the wrong channel count",
        lambda tmp: tiny_adapter().fit(X_SOURCE, Y_SOURCE, X_target=np.zeros((4, 8, 8, 2))),
        ValueError,
        r"X_target must have 1 or 3 channels",
    ),
    BadInput(
        "X_target holding NaN",
        lambda tmp: tiny_adapter().fit(X_SOURCE, Y_SOURCE, X_target=np.full((4, 8, 8), np.nan)),
        ValueError,
        "X_target contains NaN",
    ),
    BadInput(
        "X_target that is a single path",
        lambda tmp: tiny_adapter().fit(X_SOURCE, Y_SOURCE, X_target="target.png"),
        TypeError,
        "X_target must be images",
    ),
    BadInput(
        "a file that fails to decode in a worker process",
        lambda tmp: random_resnet(num_workers=2, batch_size=2).fit_transform(
            photos(tmp, corrupt=3)
        ),
        ValueError,
        r"could not read the image file '.*photo_3.png'",
    ),
    BadInput(
        "a file that fails to decode in the main process",
        lambda tmp: random_resnet().fit_transform(photos(tmp, corrupt=0)),
        ValueError,
        r"could not read the image file '.*photo_0.png'",
    ),
    BadInput(
        "python -m skdeep extract on a .npy of Python objects",
        cli_with_object_array,
        ValueError,
        r"INPUT: .*objects.npy holds Python objects .* expected a numeric array of images",
    ),
    BadInput(
        "value_range that is not finite",
        lambda tmp: random_resnet(value_range=(0, float("inf"))).fit_transform(np.zeros((2, 8, 8))),
        ValueError,
        r"value_range must be \(low, high\), two finite numbers .* got \(0, inf\)",
    ),
    BadInput(
        "value_range upside down",
        lambda tmp: random_resnet(value_range=(1, 0)).fit_transform(np.zeros((2, 8, 8))),
        ValueError,
        r"value_range must be .* low < high; got \(1, 0\)",
    ),
    BadInput(
        "a declared layout that the network contradicts",
        lambda tmp: random_resnet(layers="layer2", layouts={"layer2": "channels_last"}).fit(),
        ValueError,
        r"layouts: 'channels_last' does not fit 'layer2' .* a probe shows channels_first",
    ),
    BadInput(
        "a weights file replaced after fitting",
        weights_file_changed_after_fitting,
        WeightsChangedError,
        r"the weights of this fitted FeatureExtractor changed: the file '.*tiny.pth' now "
        r"holds weights of digest \w+, but .* fitted with weights of digest \w+",
    ),
    BadInput(
        "a feature store resumed with another .npy file",
        store_of_another_npy_file,
        ValueError,
        r"out: '.*f.zarr' was made from another \.npy file",
    ),
    BadInput(
        "a divergence callable returning a matrix",
        lambda tmp: adapt_with(pairwise),
        ValueError,
        r"divergence=pairwise must return one value \(a scalar tensor\); it returned a "
        r"tensor of shape \(8, 8\)",
    ),
    BadInput(
        "a divergence callable returning None",
        lambda tmp: adapt_with(nothing),
        TypeError,
        "divergence=nothing must return a tensor holding one value .* it returned NoneType",
    ),
    BadInput(
        "a divergence callable returning NaN",
        lambda tmp: adapt_with(not_a_number),
        ValueError,
        r"divergence=not_a_number returned nan on finite rows .* must return a finite value",
    ),
    BadInput(
        "a divergence callable computed outside torch",
        lambda tmp: adapt_with(through_numpy),
        ValueError,
        "divergence=through_numpy returned a value without a gradient",
    ),
    BadInput(
        "a divergence callable of one argument",
        lambda tmp: adapt_with(one_argument),
        TypeError,
        r"divergence must take two arguments, the source and the target rows .* one_argument "
        r"takes \(rows\)",
    ),
    BadInput(
        "devices=True",
        lambda tmp: tiny_adapter(devices=True).fit(X_SOURCE, Y_SOURCE, X_target=X_SOURCE),
        ValueError,
        "devices must be None, a positive int .* got True",
    ),
    BadInput(
        "devices listing something other than an index",
        lambda tmp: tiny_adapter(devices=[0, "a"]).fit(X_SOURCE, Y_SOURCE, X_target=X_SOURCE),
        ValueError,
        r"devices must be .* list of distinct CUDA device indices; got \[0, 'a'\]",
    ),
    BadInput(
        "a scorer's sample_domain shorter than X",
        lambda tmp: PredictionEntropyScorer()(
            ProbaOnly(), X_SOURCE, Y_SOURCE, sample_domain=np.zeros(5, int)
        ),
        ValueError,
        "sample_domain has 5 entries but X has 16 images",
    ),
    BadInput(
        "a scorer's y shorter than X",
        lambda tmp: PredictionEntropyScorer()(ProbaOnly(), X_SOURCE, Y_SOURCE[:-1]),
        ValueError,
        "y has 15 labels but X has 16 images",
    ),
    BadInput(
        "a scorer's temperature of zero",
        lambda tmp: SoftNeighborhoodDensityScorer(temperature=0)(ProbaOnly(), X_SOURCE, Y_SOURCE),
        ValueError,
        "temperature must be a positive finite number; got 0",
    ),
    BadInput(
        "a scorer given an estimator without predict_proba",
        lambda tmp: PredictionEntropyScorer()(object(), X_SOURCE, Y_SOURCE),
        TypeError,
        "estimator must be a fitted classifier with predict_proba; object has no predict_proba",
    ),
    BadInput(
        "score with sample_weight shorter than X",
        lambda tmp: (
            tiny_adapter()
            .fit(X_SOURCE, Y_SOURCE, X_target=X_SOURCE)
            .score(X_SOURCE, Y_SOURCE, sample_weight=np.ones(3))
        ),
        ValueError,
        r"sample_weight must hold one weight per image, shape \(16,\); got an array of shape",
    ),
    BadInput(
        "a history display of an empty history",
        lambda tmp: TrainingHistoryDisplay([]).plot(),
        ValueError,
        "history must be a non-empty list of dicts, one per epoch .* got a list of length 0",
    ),
    BadInput(
        "a history display of a FeatureExtractor",
        lambda tmp: TrainingHistoryDisplay.from_estimator(fitted_tiny_extractor()),
        TypeError,
        "estimator must be a fitted FineTuneClassifier or DomainAdaptedClassifier .* got "
        "FeatureExtractor",
    ),
    BadInput(
        "an alignment display with labels shorter than its images",
        lambda tmp: DomainAlignmentDisplay.from_estimator(
            fitted_tiny_extractor(), X_SOURCE, X_SOURCE, y_source=Y_SOURCE[:-1]
        ),
        ValueError,
        r"y_source must hold one label per image of X_source \(16\); got an array of shape "
        r"\(15,\)",
    ),
    BadInput(
        "an alignment display of embeddings that do not fit the domains",
        lambda tmp: DomainAlignmentDisplay(
            [np.zeros((3, 2))], np.array(["source", "target"])
        ).plot(),
        ValueError,
        r"embeddings\[0\] must have shape \(2, 2\), one row per entry of domains; got "
        r"\(3, 2\)",
    ),
    BadInput(
        "a layer-probe display of no scores",
        lambda tmp: LayerProbeDisplay({}).plot(),
        ValueError,
        "scores must be a non-empty dict of layer names to fold scores",
    ),
    BadInput(
        "the layer-probe helper given a classifier, not an extractor",
        lambda tmp: layer_probe_scores(FineTuneClassifier(), X_SOURCE, Y_SOURCE, ["layer1"]),
        TypeError,
        "extractor must be a FeatureExtractor .* got FineTuneClassifier",
    ),
    BadInput(
        "the layer-probe helper given one layer name as a string",
        lambda tmp: layer_probe_scores(random_resnet(), X_SOURCE, Y_SOURCE, "layer1"),
        ValueError,
        r"layers: name the layers to compare, as in layers=\['layer2', 'layer4'\]; got 'layer1'",
    ),
    BadInput(
        "the layer-probe helper given fewer labels than images",
        lambda tmp: layer_probe_scores(
            random_resnet(), X_SOURCE, Y_SOURCE[:-1], ["layer1", "layer2"]
        ),
        ValueError,
        "y has 15 labels but X has 16 images",
    ),
    BadInput(
        "load_digits_images(size=0)",
        lambda tmp: load_digits_images(size=0),
        ValueError,
        "size must be a positive integer or None; got 0",
    ),
    BadInput(
        "load_mnist_m_like with labels of another length",
        lambda tmp: load_mnist_m_like(np.zeros((3, 28, 28), np.uint8), labels=[0, 1]),
        ValueError,
        r"labels must hold one label per image \(3\); got an array of shape \(2,\)",
    ),
    BadInput(
        "load_mnist_m_like with a seed that is not an integer",
        lambda tmp: load_mnist_m_like(np.zeros((3, 28, 28), np.uint8), seed=0.5),
        TypeError,
        "seed must be an integer; got 0.5",
    ),
    BadInput(
        "load_cifar10(train='yes')",
        lambda tmp: load_cifar10(tmp, train="yes"),
        TypeError,
        "train must be True or False; got 'yes'",
    ),
    BadInput(
        "python -m skdeep extract --batch-size 0",
        lambda tmp: cli(tmp, "--batch-size", "0"),
        ValueError,
        "--batch-size must be an integer of 1 or more; got 0",
    ),
    BadInput(
        "python -m skdeep extract --num-workers -1",
        lambda tmp: cli(tmp, "--num-workers", "-1"),
        ValueError,
        "--num-workers must be an integer of 0 or more; got -1",
    ),
    BadInput(
        "python -m skdeep extract --workers 0",
        lambda tmp: cli(tmp, "--workers", "0"),
        ValueError,
        "--workers must be an integer of 1 or more; got 0",
    ),
    BadInput(
        "python -m skdeep extract --image-shape with four values",
        lambda tmp: cli(tmp, "--image-shape", "8", "8", "3", "1"),
        ValueError,
        r"--image-shape takes H W or H W C \(positive H and W, C 1 or 3\); got 8 8 3 1",
    ),
    BadInput(
        "python -m skdeep extract --value-range upside down",
        lambda tmp: cli(tmp, "--value-range", "1", "0"),
        ValueError,
        "--value-range takes LOW HIGH, two finite numbers with LOW < HIGH; got 1 0",
    ),
    BadInput(
        "y shorter than X",
        lambda tmp: FineTuneClassifier(TinyNet(), image_size=24).fit(X_SOURCE, Y_SOURCE[:-1]),
        ValueError,
        "y has 15 labels but X has 16 images",
    ),
]


@pytest.mark.parametrize("case", CATALOGUE, ids=[case.name for case in CATALOGUE])
def test_bad_input_gets_a_clear_first_line(case, tmp_path):
    """Bad input gets a clear first line."""
    with pytest.raises(case.error) as caught:
        case.call(tmp_path)
    first_line = str(caught.value).splitlines()[0]
    assert re.search(case.first_line, first_line), first_line
