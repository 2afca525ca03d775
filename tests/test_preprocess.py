"""Tests of batched preprocessing against torchvision's transforms."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.transforms.v2 import functional as TF

from skdeep._preprocess import Preprocessing, prepare_batch, resize_and_crop


@pytest.mark.parametrize("height, width", [(300, 400), (500, 260), (256, 256), (224, 224)])
def test_resize_and_crop_matches_torchvision(height, width):
    """Resize and crop matches torchvision."""
    images = torch.rand(2, 3, height, width)
    prep = Preprocessing(resize_size=256, crop_size=224)
    expected = TF.center_crop(TF.resize(images, [256], antialias=True), [224])
    actual = resize_and_crop(images, prep)
    assert actual.shape == (2, 3, 224, 224)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


@settings(max_examples=200, deadline=None)
@given(height=st.integers(1, 64), width=st.integers(1, 64), size=st.integers(1, 64))
def test_the_resized_size_is_torchvisions_for_every_shape(height, width, size):
    """The longer side follows torchvision's rounding (a 13x13 image at 15 is 15x15)."""
    images = torch.rand(1, 1, height, width)
    expected = TF.center_crop(TF.resize(images, [size], antialias=True), [size])
    actual = resize_and_crop(images, Preprocessing(resize_size=size, crop_size=size))
    assert actual.shape == expected.shape == (1, 1, size, size)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_prepare_batch_normalizes_like_torchvision():
    """Prepare batch normalizes like torchvision."""
    raw = torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8)
    prep = Preprocessing(resize_size=40, crop_size=32)
    out = prepare_batch(raw, prep, torch.device("cpu"), (0.0, 255.0))
    expected = TF.normalize(TF.center_crop(raw.float() / 255, [32]), prep.mean, prep.std)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_prepare_batch_works_where_torch_refuses_eps_zero(monkeypatch):
    """Torch 2.11 refuses batch_norm(eps=0) even in eval mode: preprocessing must not need it."""
    original = F.batch_norm

    def strict_batch_norm(*args, **kwargs):
        eps = kwargs.get("eps", args[7] if len(args) > 7 else 1e-5)
        if eps <= 0:
            raise ValueError(f"batch_norm eps must be positive, but got {eps}")
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "batch_norm", strict_batch_norm)
    raw = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    prep = Preprocessing(resize_size=32, crop_size=32)
    out = prepare_batch(raw, prep, torch.device("cpu"), (0.0, 255.0))
    expected = TF.normalize(raw.float() / 255, prep.mean, prep.std)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_gray_becomes_rgb_and_value_range_is_honoured():
    """Gray becomes RGB and value range is honoured."""
    raw = torch.rand(2, 1, 16, 16) * 16
    prep = Preprocessing(resize_size=16, crop_size=16)
    out = prepare_batch(raw, prep, torch.device("cpu"), (0.0, 16.0), torch.bfloat16)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.bfloat16
    rgb = (raw / 16).expand(-1, 3, -1, -1)
    torch.testing.assert_close(
        out.float(), TF.normalize(rgb, prep.mean, prep.std), atol=0.05, rtol=0.01
    )


def test_preprocessing_comes_from_the_weights_metadata():
    """Preprocessing comes from the weights metadata."""
    weights = torchvision.models.get_model_weights("efficientnet_b1").IMAGENET1K_V1
    prep = Preprocessing.from_weights(weights)
    assert (prep.resize_size, prep.crop_size, prep.interpolation) == (256, 240, "bicubic")
    assert Preprocessing.from_weights(None) == Preprocessing()
    small = prep.with_image_size(32)
    assert (small.resize_size, small.crop_size, small.mean) == (32, 32, prep.mean)


def test_crop_larger_than_resize_is_an_error():
    """Crop larger than resize is an error."""
    with pytest.raises(ValueError, match="cannot crop"):
        resize_and_crop(torch.rand(1, 3, 50, 60), Preprocessing(resize_size=32, crop_size=40))
