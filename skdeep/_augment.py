"""Batched data augmentation on the compute device: random crop and horizontal flip."""

from __future__ import annotations

import torch
import torch.nn.functional as F

AUGMENTATIONS = {
    True: ("crop", "flip"),
    "crop+flip": ("crop", "flip"),
    "crop": ("crop",),
    "flip": ("flip",),
    False: (),
    None: (),
}
MIN_CROP_SIDE = 0.8  # random crops keep 80% to 100% of each side


def augment(
    images: torch.Tensor,
    kinds: tuple[str, ...],
    generator: torch.Generator,
    share: slice | None = None,
    batch: int | None = None,
) -> torch.Tensor:
    """Randomly crop (then resize back) and/or flip each image of a batch.

    Parameters
    ----------
    images : tensor (B, C, H, W), float
    kinds : tuple of {"crop", "flip"}
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
    if "crop" not in kinds:
        mask = flip[share].to(images.device).view(-1, 1, 1, 1)
        return torch.where(mask, images.flip(-1), images)
    # One affine resampling per image: zoom into a random window and mirror it.
    side = MIN_CROP_SIDE + (1 - MIN_CROP_SIDE) * torch.rand(n, generator=generator)
    shift = (1 - side) * (2 * torch.rand(2, n, generator=generator) - 1)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = torch.where(flip, -side, side)
    theta[:, 1, 1] = side
    theta[:, 0, 2], theta[:, 1, 2] = shift[0], shift[1]
    theta = theta[share].to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(
        images, grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )
    return out.contiguous(memory_format=torch.channels_last)
