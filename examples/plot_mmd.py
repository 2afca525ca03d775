"""
What the divergence penalties measure
=====================================

:class:`~skdeep.DomainAdaptedClassifier` adds a divergence between the features of
source and target images to its training loss. This example computes the divergences of
:mod:`skdeep.losses` between two samples of 8-dimensional features while the target
drifts away from the source in two ways: its mean moves, or its spread grows. It runs in
a few seconds on a CPU, with no network and no data to download (the documentation build
runs it).
"""

import matplotlib.pyplot as plt
import numpy as np
import torch

from skdeep.losses import coral, mmd

# %%
# Two samples of features
# -----------------------
#
# 128 source rows from a standard normal distribution, and 128 target rows from the same
# distribution (standardized, so that scaling them does not move their mean), then
# changed: moved by ``shift`` along every axis, or scaled by ``1 + growth``.

generator = torch.Generator().manual_seed(0)
source = torch.randn(128, 8, generator=generator)
noise = torch.randn(128, 8, generator=generator)
noise = (noise - noise.mean(0)) / noise.std(0)
amounts = np.linspace(0.0, 1.0, 11)


def divergences(target: torch.Tensor) -> dict[str, float]:
    """Return the divergences between ``source`` and ``target``, as training computes them."""
    return {
        "MMD, Laplacian kernels (default)": mmd(source, target, "laplacian", unbiased=False),
        "MMD, Gaussian kernels (DAN)": mmd(source, target, "gaussian", unbiased=False),
        "MMD, linear kernel (DDC)": mmd(source, target, "linear", unbiased=False),
        "CORAL": coral(source, target),
    }


moved = [divergences(noise + shift) for shift in amounts]
spread = [divergences(noise * (1 + growth)) for growth in amounts]

# %%
# How each one grows
# ------------------
#
# Each curve is divided by its value at no change, when both samples come from one
# distribution and differ only by chance: the divergences have different scales, which
# is what ``divergence_weight`` absorbs. The linear kernel compares only the means, so it
# does not see the spread grow; CORAL compares only the covariances, so it does not see
# the mean move; the multi-kernel MMDs see both.

figure, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
for ax, runs, label in [
    (axes[0], moved, "target mean moved by"),
    (axes[1], spread, "target spread grown by"),
]:
    for name in runs[0]:
        values = np.array([float(run[name]) for run in runs])
        ax.plot(amounts, values / values[0], marker="o", label=name)
    ax.set_xlabel(label)
    ax.set_yscale("log")
axes[0].set_ylabel("divergence / its value at no change")
axes[1].legend(loc="upper left", fontsize="small")
figure.suptitle("Divergences between 128 source and 128 target rows of 8 features")
figure.tight_layout()
plt.show()
