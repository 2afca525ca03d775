"""Batched data augmentation on the compute device: random crop, rotation and flip."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KINDS = ("crop", "rotate", "flip")  # in the order they are drawn


def parse_augment(value) -> tuple[str, ...]:
    """Return the kinds of augmentation that an ``augment`` parameter names.

    True means crops and flips, False or None none; a string joins kinds with "+"
    ("crop", "crop+rotate", "rotate+flip", ...).
    """
    if value is True:
        return ("crop", "flip")
    if value is False or value is None:
        return ()
    parts = value.split("+") if isinstance(value, str) else [value]
    if not all(part in KINDS for part in parts) or len(set(parts)) != len(parts):
        raise ValueError(
            "augment must be True, False, None or kinds from 'crop', 'rotate' and 'flip' "
            f"joined by '+' (such as 'crop+rotate'); got {value!r}"
        )
    return tuple(kind for kind in KINDS if kind in parts)


MIN_CROP_SIDE = 0.8  # random crops keep 80% to 100% of each side
MAX_ROTATION = 15.0  # degrees: random rotations turn each image by -15 to +15 degrees


def augment(
    images: torch.Tensor,
    kinds: tuple[str, ...],
    generator: torch.Generator,
    share: slice | None = None,
    batch: int | None = None,
) -> torch.Tensor:
    """Randomly crop (then resize back), rotate and/or flip each image of a batch.

    Parameters
    ----------
    images : tensor (B, C, H, W), float
    kinds : tuple of {"crop", "rotate", "flip"}
        Crops keep 80% to 100% of each side (:data:`MIN_CROP_SIDE`); rotations turn by
        up to :data:`MAX_ROTATION` degrees either way. Crops and rotations resample
        each image once, reflecting it at the borders.
    generator : torch.Generator
        A CPU generator: the same seed gives the same augmentations on any device.
    share, batch : slice and int, optional
        ``images`` are the ``share`` of a batch of ``batch`` images (one rank's part of
        a global batch in data-parallel training): the random draws are those of the
        whole batch, so every part gets what one process would give it.
    """
    if not kinds:
        return images
    n = len(images) if batch is None else batch
    share = slice(0, n) if share is None else share
    flip = (
        torch.rand(n, generator=generator) < 0.5
        if "flip" in kinds
        else torch.zeros(n, dtype=torch.bool)
    )
    if "crop" not in kinds and "rotate" not in kinds:
        mask = flip[share].to(images.device).view(-1, 1, 1, 1)
        return torch.where(mask, images.flip(-1), images)
    # One affine resampling per image: zoom into a random window, turn and mirror it.
    # (The draws come in this order so that each kind's draws stay as they were before
    # another kind was added.)
    side, shift = torch.ones(n), torch.zeros(2, n)
    if "crop" in kinds:
        side = MIN_CROP_SIDE + (1 - MIN_CROP_SIDE) * torch.rand(n, generator=generator)
        shift = (1 - side) * (2 * torch.rand(2, n, generator=generator) - 1)
    angle = torch.zeros(n)
    if "rotate" in kinds:
        angle = math.radians(MAX_ROTATION) * (2 * torch.rand(n, generator=generator) - 1)
    mirror = torch.where(flip, -1.0, 1.0)
    cos, sin = side * torch.cos(angle), side * torch.sin(angle)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = mirror * cos, -sin
    theta[:, 1, 0], theta[:, 1, 1] = mirror * sin, cos
    theta[:, 0, 2], theta[:, 1, 2] = shift[0], shift[1]
    theta = theta[share].to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(
        images, grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )
    return out.contiguous(memory_format=torch.channels_last)
