"""Tests of input validation and image sources."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from skdeep._images import ArraySource, ListSource, as_image_source, decode_image
from skdeep._preprocess import Preprocessing, prepare_images

PREP = Preprocessing(resize_size=16, crop_size=16)
# Network input without normalization: pixels scaled to [0, 1].
UNIT = Preprocessing(resize_size=16, crop_size=16, mean=(0.0,) * 3, std=(1.0,) * 3)


def raw_images(source, batch_size=5, **kwargs):
    """Every image of ``source`` as read (unresized), in order."""
    return [
        image
        for raw in source.batches(batch_size, PREP, **kwargs)
        for pixels, _ in raw
        for image in pixels
    ]


def all_batches(source, batch_size=5, **kwargs):
    """Concatenate every raw batch of ``source`` (images of one size)."""
    return torch.stack(raw_images(source, batch_size, **kwargs))


def network_input(source, prep=UNIT, batch_size=8):
    """Concatenate the network input of every batch of ``source``."""
    cpu = torch.device("cpu")
    return torch.cat([prepare_images(raw, prep, cpu) for raw in source.batches(batch_size, prep)])


@pytest.mark.parametrize(
    "shape, channels",
    [((6, 16, 16), 1), ((6, 16, 16, 1), 1), ((6, 16, 16, 3), 3)],
)
def test_arrays_become_nchw_batches_without_copying(shape, channels):
    """Arrays become NCHW batches without copying."""
    X = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    source = as_image_source(X)
    assert isinstance(source, ArraySource)
    assert np.shares_memory(source.images, X)
    batch = all_batches(source)
    assert batch.shape == (6, channels, 16, 16)
    np.testing.assert_array_equal(batch.permute(0, 2, 3, 1).numpy().reshape(shape), X)


def test_batches_follow_the_given_indices():
    """Batches follow the given indices."""
    X = np.arange(5 * 4 * 4, dtype=np.uint8).reshape(5, 4, 4)
    batch = all_batches(as_image_source(X), batch_size=2, indices=[4, 0, 2])
    np.testing.assert_array_equal(batch[:, 0].numpy(), X[[4, 0, 2]])


def test_flat_rows_need_image_shape():
    """Flat rows need image shape."""
    X = np.zeros((3, 64))
    with pytest.raises(ValueError, match=r"image_shape=\(H, W\)"):
        as_image_source(X)
    source = as_image_source(X, image_shape=(8, 8))
    assert source.images.shape == (3, 8, 8, 1)
    with pytest.raises(ValueError, match="holds 49 pixels but the rows of X have 64"):
        as_image_source(X, image_shape=(7, 7))


def test_load_digits_rows_work_with_their_value_range():
    """Load digits rows work with their value range."""
    from sklearn.datasets import load_digits

    X = load_digits().data[:10]
    with pytest.raises(ValueError, match=r"value_range=\(0, 16\)"):
        as_image_source(X, image_shape=(8, 8))
    source = as_image_source(X, image_shape=(8, 8), value_range=(0, 16))
    assert source.value_range == (0.0, 16.0)


@pytest.mark.parametrize(
    "X, error, message",
    [
        (np.zeros((0, 8, 8)), ValueError, "X is empty"),
        ([], ValueError, "X is empty"),
        (np.zeros((5, 3)), ValueError, r"image_shape"),
        (np.zeros((4, 8, 8, 2)), ValueError, r"1 or 3 channels .* shape \(4, 8, 8, 2\)"),
        (np.zeros((4, 3, 8, 8)), ValueError, "channels-first"),
        (np.zeros((32, 32, 3)), ValueError, "looks like one RGB image"),
        (np.zeros(5), ValueError, r"got an array of shape \(5,\)"),
        (np.zeros((2, 2, 8, 8, 3)), ValueError, r"shape \(2, 2, 8, 8, 3\)"),
        (np.array([[[np.nan]]]), ValueError, "NaN or infinity"),
        (np.full((1, 4, 4), np.inf), ValueError, "NaN or infinity"),
        (np.full((1, 4, 4), 2.0), ValueError, r"values in \[2, 2\] but float pixels"),
        (np.full((1, 4, 4), 300), ValueError, r"integer pixels must lie in value_range=\(0, 255\)"),
        (np.full((1, 4, 4), -1, dtype=np.int8), ValueError, "integer pixels"),
        (np.zeros((2, 4, 4), dtype=bool), TypeError, "dtype bool"),
        ("image.png", TypeError, "wrap it in a list"),
        ({"a": 1}, TypeError, "got dict"),
        (None, TypeError, "got NoneType"),
        (torch.zeros(2, 3, 8, 8), TypeError, r"permute\(0, 2, 3, 1\)"),
        ([{"a": 1}], TypeError, "X must be images"),
    ],
)
def test_bad_inputs_get_clear_errors(X, error, message):
    """Bad inputs get clear errors."""
    with pytest.raises(error, match=message):
        as_image_source(X)


def test_image_shape_must_match_images():
    """Image shape must match images."""
    with pytest.raises(ValueError, match="does not match"):
        as_image_source(np.zeros((2, 8, 8)), image_shape=(4, 16))


def test_integer_images_keep_their_values():
    """Integer images keep their values."""
    X = np.array([[[0, 300], [4095, 17]]], dtype=np.int64)
    batch = all_batches(as_image_source(X, value_range=(0, 4095)))
    np.testing.assert_array_equal(batch[0, 0].numpy(), X[0])
    eight_bit = all_batches(as_image_source(X % 256))
    assert eight_bit.dtype == torch.uint8


def test_float_images_in_unit_range_are_accepted():
    """Float images in unit range are accepted."""
    X = np.random.default_rng(0).random((3, 8, 8, 3))
    assert as_image_source(X).value_range == (0.0, 1.0)


def test_list_of_files_decodes_lazily_and_matches_arrays(image_files, images):
    """List of files decodes lazily and matches arrays."""
    source = as_image_source(image_files)
    assert isinstance(source, ListSource)
    batch = all_batches(source)
    assert batch.shape == (12, 3, 32, 32) and batch.dtype == torch.uint8
    torch.testing.assert_close(batch, torch.from_numpy(images).permute(0, 3, 1, 2))


def test_files_are_decoded_by_workers(image_files):
    """Files are decoded by workers."""
    source = as_image_source(image_files)
    batches = list(source.batches(4, PREP, num_workers=2))
    assert [sum(len(pixels) for pixels, _ in raw) for raw in batches] == [4, 4, 4]
    assert all(len(raw) == 1 for raw in batches)  # images of one size: one run each


def test_ragged_arrays_and_pil_images_are_brought_to_one_size():
    """Ragged arrays and PIL images are brought to one size."""
    rng = np.random.default_rng(0)
    items = [
        rng.integers(0, 256, (20, 30, 3), dtype=np.uint8),
        rng.random((12, 12)),
        Image.fromarray(rng.integers(0, 256, (40, 16), dtype=np.uint8)),
    ]
    batch = network_input(as_image_source(items))
    assert batch.shape == (3, 3, 16, 16)
    assert 0.0 <= batch.min() and batch.max() <= 1.0


def test_missing_and_corrupt_files_are_named(tmp_path, image_files):
    """Missing and corrupt files are named."""
    missing = str(tmp_path / "nope.jpg")
    with pytest.raises(ValueError, match=r"X\[1\]: image file .*nope.jpg.* does not exist"):
        as_image_source([image_files[0], missing])
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"not an image at all")
    source = as_image_source([image_files[0], str(corrupt)])
    with pytest.raises(ValueError, match=r"could not read the image file .*corrupt.jpg"):
        list(source.batches(2, PREP))


def test_bad_items_in_lists_are_named():
    """Bad items in lists are named."""
    with pytest.raises(ValueError, match=r"X\[1\] must be one image"):
        as_image_source([np.zeros((8, 8)), np.zeros((2, 8, 8, 3))])
    with pytest.raises(ValueError, match=r"X\[0\] contains NaN"):
        as_image_source([np.full((8, 8), np.nan)])
    with pytest.raises(TypeError, match=r"X\[1\] is a int"):
        as_image_source([np.zeros((8, 8)), 3])


def test_fingerprints_identify_image_content(images, image_files):
    """Fingerprints identify image content."""
    prints = as_image_source(images).fingerprints()
    assert len(set(prints)) == len(images)
    assert as_image_source(images.copy()).fingerprints() == prints
    assert as_image_source(images[::-1]).fingerprints() == prints[::-1]
    altered = images.copy()
    altered[3, 0, 0, 0] ^= 1
    changed = as_image_source(altered).fingerprints()
    assert [a == b for a, b in zip(changed, prints, strict=True)].count(False) == 1
    assert len(set(as_image_source(image_files).fingerprints())) == len(image_files)


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_16_bit_files_are_read_at_full_depth(tmp_path, suffix):
    """16 bit files are read at full depth: as the uint16 array they were saved from."""
    values = np.linspace(0, 65535, 24 * 24).astype(np.uint16).reshape(24, 24)
    path = tmp_path / f"deep.{suffix}"
    Image.fromarray(values).save(path)  # mode I;16
    pixels, value_range = decode_image(str(path), 48)
    assert pixels.shape == (24, 24, 1) and value_range == (0.0, 65535.0)
    np.testing.assert_array_equal(pixels[..., 0], values)  # not clipped to white
    from_file = network_input(as_image_source([str(path)]))
    from_array = network_input(as_image_source(values[None], value_range=(0, 65535)))
    torch.testing.assert_close(from_file, from_array, atol=0, rtol=0)


def _containers(images: np.ndarray, tmp_path) -> dict:
    """Return the same pixels in every container skdeep takes."""
    files = []
    for index, image in enumerate(images):
        path = tmp_path / f"{index}.png"
        Image.fromarray(image if image.shape[-1] == 3 else image[..., 0]).save(path)
        files.append(str(path))
    as_pil = [Image.fromarray(image if image.shape[-1] == 3 else image[..., 0]) for image in images]
    return {
        "list": list(images),
        "PIL images": as_pil,
        "PNG files": files,
        "flat rows": images.reshape(len(images), -1),
    }


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    height=st.integers(4, 40),
    width=st.integers(4, 40),
    channels=st.sampled_from([1, 3]),
    size=st.integers(4, 24),
    interpolation=st.sampled_from(["bilinear", "bicubic", "nearest"]),
)
def test_the_same_pixels_give_the_same_input_in_every_container(
    tmp_path_factory, height, width, channels, size, interpolation
):
    """Arrays, lists, ragged lists, PIL images and PNG files of the same pixels agree exactly."""
    rng = np.random.default_rng(height * 41 + width)
    images = rng.integers(0, 256, (3, height, width, channels), dtype=np.uint8)
    prep = Preprocessing(size, size, interpolation=interpolation)
    expected = network_input(as_image_source(images), prep)
    containers = _containers(images, tmp_path_factory.mktemp("png"))
    for name, X in containers.items():
        shape = images.shape[1:] if name == "flat rows" else None
        actual = network_input(as_image_source(X, image_shape=shape), prep)
        torch.testing.assert_close(actual, expected, atol=0, rtol=0, msg=name)
    other = rng.integers(0, 256, (height + 3, width + 1, channels), dtype=np.uint8)
    ragged = network_input(as_image_source([*images, other]), prep)[:3]
    torch.testing.assert_close(ragged, expected, atol=0, rtol=0, msg="ragged list")
    fingerprints = as_image_source(images).fingerprints()
    assert as_image_source(list(images)).fingerprints() == fingerprints


def test_a_decompression_bomb_is_named_by_its_file(tmp_path, monkeypatch):
    """Pillow's decompression-bomb error, as any unreadable file, names the file."""
    from skdeep._images import decode_image

    path = tmp_path / "huge.png"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 4,096 pixels: over twice that
    with pytest.raises(ValueError, match=r"could not read the image file '.*huge.png'"):
        decode_image(str(path), 64)
