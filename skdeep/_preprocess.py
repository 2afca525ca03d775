"""Batched preprocessing on the compute device: resize, crop, gray to RGB, normalize.

The numbers come from the weights' own metadata (torchvision's ``weights.transforms()``),
so features match what the network was trained on. Everything here works on whole
batch tensors; per-image PIL transforms are what makes naive pipelines slow.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How raw pixels become network input.

    Images are resized so that their shorter side is ``resize_size``, center-cropped
    to ``crop_size`` x ``crop_size``, scaled to [0, 1] and normalized with
    ``mean`` / ``std``.
    """

    resize_size: int = 256
    crop_size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"

    @classmethod
    def from_weights(cls, weights) -> Preprocessing:
        """Read the preprocessing of a torchvision weights enum (or ImageNet defaults)."""
        if weights is None:
            return cls()
        transform = weights.transforms()
        resize = getattr(transform, "resize_size", [256])
        crop = getattr(transform, "crop_size", [224])
        interpolation = getattr(transform, "interpolation", None)
        return cls(
            resize_size=int(resize[0]),
            crop_size=int(crop[0]),
            mean=tuple(float(v) for v in getattr(transform, "mean", IMAGENET_MEAN)),
            std=tuple(float(v) for v in getattr(transform, "std", IMAGENET_STD)),
            interpolation=getattr(interpolation, "value", "bilinear"),
        )

    def with_image_size(self, image_size: int | None) -> Preprocessing:
        """Override the geometry: shorter side to ``image_size``, then a square crop."""
        if image_size is None:
            return self
        return replace(self, resize_size=int(image_size), crop_size=int(image_size))


def resize_and_crop(images: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """Resize a float batch ``(B, C, H, W)`` (shorter side) and center-crop it."""
    height, width = images.shape[-2:]
    crop = prep.crop_size
    if min(height, width) != prep.resize_size:
        short, long = min(height, width), max(height, width)
        # torchvision's rule for the longer side: multiply before dividing, then round
        # down (``width * (size / short)`` gives 14.999... for a 13x13 image at 15).
        new_long = int(prep.resize_size * long / short)
        size = (prep.resize_size, new_long) if height <= width else (new_long, prep.resize_size)
        images = F.interpolate(
            images,
            size=size,
            mode=prep.interpolation,
            antialias=prep.interpolation in ("bilinear", "bicubic"),
            align_corners=False if prep.interpolation in ("bilinear", "bicubic") else None,
        )
        height, width = size
    if height < crop or width < crop:
        raise ValueError(
            f"cannot crop {crop}x{crop} from an image resized to {height}x{width}; "
            "image_size must not exceed the resize size"
        )
    top = round((height - crop) / 2.0)
    left = round((width - crop) / 2.0)
    return images[..., top : top + crop, left : left + crop]


def prepare_images(
    runs: list[tuple[torch.Tensor, tuple[float, float]]],
    prep: Preprocessing,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Turn a raw batch (runs of same-size images) into one batch of network input.

    Every run goes through :func:`prepare_batch`; an image gives the same input alone
    as in a run of others, so arrays, lists, PIL images and files of the same pixels
    give the same input.

    Parameters
    ----------
    runs : list of (tensor, (low, high))
        Pixels ``(b, C, H, W)`` and their value range, as image sources yield them.
    prep, device, dtype
        As in :func:`prepare_batch`.
    """
    parts = [
        prepare_batch(pixels, prep, device, value_range, dtype) for pixels, value_range in runs
    ]
    return (
        parts[0]
        if len(parts) == 1
        else torch.cat(parts).contiguous(memory_format=torch.channels_last)
    )


def prepare_batch(
    batch: torch.Tensor,
    prep: Preprocessing,
    device: torch.device,
    value_range: tuple[float, float],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Turn a raw batch ``(B, C, H, W)`` (C is 1 or 3) into normalized network input.

    Parameters
    ----------
    batch : tensor of uint8 or float
        Pixels with values in ``value_range``; any memory layout.
    prep : Preprocessing
        Target geometry and normalization.
    device : torch.device
        Where the work happens (the batch is moved there first).
    value_range : (low, high)
        The pixel values that map to 0 and 1.
    dtype : torch.dtype
        Dtype of the returned tensor.

    Returns
    -------
    tensor of shape (B, 3, crop_size, crop_size), channels_last, on ``device``
    """
    batch = batch.to(device, non_blocking=True)
    # On the CPU, uint8 images resize in uint8 (a fast kernel, and what PIL does in
    # torchvision's reference transforms); elsewhere in float.
    if batch.dtype != torch.uint8 or device.type != "cpu":
        batch = batch.float()
    batch = resize_and_crop(batch, prep)
    if batch.shape[1] == 1:
        batch = batch.expand(-1, 3, -1, -1)
    batch = batch.to(dtype, memory_format=torch.channels_last)
    low, high = value_range
    mean = torch.tensor(prep.mean, device=device)
    std = torch.tensor(prep.std, device=device)
    # (x - low) / (high - low), then (x - mean) / std, as one per-channel affine map.
    scale = 1.0 / ((high - low) * std)
    shift = -(low / (high - low) + mean) / std
    # batch_norm in eval mode computes exactly x * weight + bias per channel here
    # (zero mean, unit variance), with kernels tuned for channels_last. Some torch
    # releases (2.11 among them) refuse eps=0 even in eval mode: 1e-12 is positive but
    # vanishes against the unit variance (1 + 1e-12 rounds to 1 in float32).
    ones = torch.ones(3, device=device)
    return F.batch_norm(batch, torch.zeros_like(ones), ones, scale, shift, False, 0.0, 1e-12)
