"""Input validation and image sources.

Every estimator turns its ``X`` into an :class:`ImageSource` once, through
:func:`as_image_source`. A source validates up front what is cheap to check (shapes,
dtypes, value ranges, that files exist), keeps a reference to the data instead of a
copy, and yields raw batches on demand: in-memory arrays are sliced directly, while
files, PIL images and arrays of different sizes go through a ``DataLoader`` whose
workers decode them. Either way the pixels arrive as they are, in the dtype of
:func:`network_pixels`, and :func:`skdeep._preprocess.prepare_images` resizes and
normalizes them: one preprocessing, so the same pixels give the same features in any
container.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ._identity import file_fingerprint
from ._preprocess import Preprocessing

UNIT_RANGE = (0.0, 1.0)
UINT8_RANGE = (0.0, 255.0)
# Float arrays are scanned for NaN and range in blocks of about this many bytes.
_SCAN_BLOCK_BYTES = 64 * 2**20


RawBatch = list
"""A batch as read, before preprocessing: a list of runs ``(pixels, value_range)``.

``pixels`` is a tensor ``(b, C, H, W)`` of images of one size, uint8 (0-255 pixels) or
float32, and ``value_range`` the values in it that mean black and white. Every source
yields its images this way, so that :func:`skdeep._preprocess.prepare_images` gives the
same pixels the same network input whatever held them.
"""


class ImageSource:
    """A validated collection of images that yields raw batches (see :data:`RawBatch`)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def batches(
        self,
        batch_size: int,
        prep: Preprocessing,
        indices: Sequence[int] | None = None,
        num_workers: int = 0,
    ) -> Iterator[RawBatch]:
        """Yield raw batches of the images at ``indices`` (default: all), in order."""
        raise NotImplementedError

    def fingerprints(self, indices: Sequence[int] | None = None) -> list[bytes]:
        """One digest per image (at ``indices``, default all), equal for equal images.

        The keys of the feature cache; a few of them tell data-parallel ranks whether
        they were given the same images.
        """
        raise NotImplementedError

    def sample_digest(self, indices: Sequence[int]) -> bytes:
        """Digest the images at ``indices`` alike on every machine that holds the same data.

        Pixels of images held in memory; the name and the size of files (their folders,
        modification times and the spelling of their paths differ between machines'
        copies; their pixels are not read, so a same-sized file of other pixels passes).
        """
        digest = hashlib.blake2b(digest_size=16)
        for part in self._portable_fingerprints(indices):
            digest.update(part)
        return digest.digest()

    def _portable_fingerprints(self, indices: Sequence[int]) -> list[bytes]:
        return self.fingerprints(indices)


def network_pixels(pixels: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """Return pixels in the dtype they are resized in, whatever held them.

    uint8 when they are integers on the 0-255 scale (resized in uint8 on the CPU, as
    PIL does for torchvision's reference transforms), float32 otherwise. Arrays, list
    items, PIL images and decoded files all go through this one rule.
    """
    if pixels.dtype.kind in "iu" and tuple(value_range) == UINT8_RANGE:
        # Values were checked against value_range: 0-255 fits uint8.
        return pixels if pixels.dtype == np.uint8 else pixels.astype(np.uint8)
    return pixels if pixels.dtype == np.float32 else pixels.astype(np.float32)


def _image_digest(image: np.ndarray, value_range) -> bytes:
    """Digest one image ``(H, W, C)`` by its pixels, dtype and value range.

    The same pixels give the same digest in an array or in a list.
    """
    header = f"{image.shape}|{image.dtype}|{tuple(map(float, value_range))}"
    return _digest(header, np.ascontiguousarray(image).data)


class ArraySource(ImageSource):
    """Images of one size held in a NumPy array ``(n, H, W, C)``, C in {1, 3}.

    Attributes
    ----------
    value_range : (low, high)
        The pixel values that mean black and white.
    """

    def __init__(self, images: np.ndarray, value_range: tuple[float, float]):
        self.images = images
        self.value_range = value_range

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size, prep, indices=None, num_workers=0):
        n = len(self.images) if indices is None else len(indices)
        for start in range(0, n, batch_size):
            if indices is None:
                chunk = self.images[start : start + batch_size]
            else:
                chunk = self.images[np.asarray(indices[start : start + batch_size])]
            # NHWC memory seen as NCHW: exactly the channels_last layout, no copy.
            batch = _as_tensor(network_pixels(chunk, self.value_range)).permute(0, 3, 1, 2)
            yield [(batch, self.value_range)]

    def fingerprints(self, indices=None):
        images = self.images if indices is None else (self.images[i] for i in indices)
        return [_image_digest(image, self.value_range) for image in images]


class _PerImageDataset(torch.utils.data.Dataset):
    """Decodes one item (path, PIL image or array) into pixels ``(C, H, W)``, unresized.

    Resizing happens with the rest of the preprocessing, on the batch, exactly as for
    arrays: only decoding is per image.
    """

    def __init__(self, items: list, value_ranges: list, prep: Preprocessing):
        self.items = items
        self.value_ranges = value_ranges
        self.prep = prep

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, tuple[float, float]]:
        item = self.items[index]
        if isinstance(item, np.ndarray):
            pixels = item if item.ndim == 3 else item[:, :, None]
            value_range = self.value_ranges[index]
        else:
            # JPEG files decode at a reduced scale that still covers twice the target.
            pixels, value_range = decode_image(item, 2 * self.prep.resize_size)
        image = _as_tensor(network_pixels(pixels, value_range)).permute(2, 0, 1)
        return image, value_range


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """Wrap ``array`` as a tensor sharing its memory; read-only arrays are copied first.

    torch warns about read-only memory, and silencing that with ``catch_warnings``
    would change the process's warning filters from the reading thread, which is not
    thread-safe; a batch's copy costs little next to the network.
    """
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array)


# PIL modes of one channel deeper than 8 bits, and the value that means white. Pillow's
# own conversion to RGB clips them at 255, which would turn most of the image white.
_DEEP_GRAY_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535}


def decode_image(item, draft_size: int) -> tuple[np.ndarray, tuple[float, float]]:
    """Pixels ``(H, W, C)`` of a file path or PIL image, and the values of black and white.

    8-bit images come as uint8 (one channel for grayscale, else RGB) on the 0-255
    scale (JPEG files decode at a reduced scale that still covers ``draft_size``).
    16-bit and 32-bit grayscale images (PNG ``I;16``, TIFF) keep their full depth, as
    one channel of their own values, white at 65535 (or 2**32 - 1); floating-point
    images (mode ``F``) as one float32 channel in [0, 1]. The same pixels give the
    same result as the array they were saved from.
    """
    if isinstance(item, Image.Image):
        return _pixels(item)
    try:
        with Image.open(item) as image:
            if image.mode not in _DEEP_GRAY_MODES and image.mode not in ("I", "F"):
                image.draft("RGB", (draft_size, draft_size))
            return _pixels(image)
    except (
        OSError,
        UnidentifiedImageError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,  # when warning filters make it an error
    ) as exc:
        raise ValueError(f"could not read the image file {str(item)!r}: {exc}") from exc


def _pixels(image: Image.Image) -> tuple[np.ndarray, tuple[float, float]]:
    if image.mode == "L":
        return np.asarray(image)[:, :, None], UINT8_RANGE
    if image.mode in _DEEP_GRAY_MODES:
        white = _DEEP_GRAY_MODES[image.mode]
    elif image.mode == "I":
        # 32-bit integers: 16-bit PNGs open this way in some Pillow versions.
        white = 65535 if np.asarray(image).max(initial=0) <= 65535 else 2**32 - 1
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float32)
        if values.size and (values.min() < 0 or values.max() > 1):
            raise ValueError(
                f"a floating-point image must hold values in [0, 1]; got "
                f"[{values.min():g}, {values.max():g}]"
            )
        return values[:, :, None], UNIT_RANGE
    else:
        return np.asarray(image.convert("RGB")), UINT8_RANGE
    values = np.asarray(image)
    if values.min(initial=0) < 0:
        raise ValueError(f"a {image.mode} image must not hold negative values")
    return values.astype(np.int64 if white > 65535 else np.int32)[:, :, None], (0.0, float(white))


class ListSource(ImageSource):
    """A list of file paths, PIL images or arrays, of any sizes."""

    def __init__(self, items: list, value_ranges: list):
        self.items = items
        self.value_ranges = value_ranges

    def __len__(self) -> int:
        return len(self.items)

    def batches(self, batch_size, prep, indices=None, num_workers=0):
        dataset = _PerImageDataset(self.items, self.value_ranges, prep)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=indices,
            num_workers=num_workers,
            collate_fn=list,
        )
        order = range(len(self.items)) if indices is None else indices
        done = 0
        decoding = iter(loader)
        try:
            for decoded in decoding:
                yield _runs([image for image, _ in decoded], [vr for _, vr in decoded])
                done += len(decoded)
        except Exception:
            if num_workers == 0:
                raise
            # A worker's error arrives wrapped ("Caught ValueError in DataLoader worker
            # process 0"): decode the failed batch here to raise it with the file first.
            for index in order[done : done + batch_size]:
                dataset[index]
            raise
        finally:
            # The workers end now, even while an error's traceback keeps this frame
            # (and the loader) alive; DataLoader has no public way to say so.
            shutdown = getattr(decoding, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def fingerprints(self, indices=None):
        indices = range(len(self.items)) if indices is None else indices
        return [_item_digest(self.items[i], self.value_ranges[i]) for i in indices]

    def _portable_fingerprints(self, indices):
        return [
            _item_digest(self.items[i], self.value_ranges[i])
            if isinstance(self.items[i], (np.ndarray, Image.Image))
            else f"{os.path.basename(self.items[i])}|{os.path.getsize(self.items[i])}".encode()
            for i in indices
        ]


def _runs(images: list[torch.Tensor], ranges: list) -> RawBatch:
    """Stack consecutive images of one size, dtype and value range into runs."""
    runs: RawBatch = []
    start = 0
    for end in range(1, len(images) + 1):
        if end == len(images) or (
            images[end].shape != images[start].shape
            or images[end].dtype != images[start].dtype
            or ranges[end] != ranges[start]
        ):
            pixels = images[start][None] if end - start == 1 else torch.stack(images[start:end])
            runs.append((pixels, ranges[start]))
            start = end
    return runs


def _item_digest(item, value_range) -> bytes:
    if isinstance(item, np.ndarray):
        return _image_digest(item if item.ndim == 3 else item[:, :, None], value_range)
    if isinstance(item, Image.Image):
        return _digest(f"{item.mode}|{item.size}", item.tobytes())
    # Files are known by location, modification time and size; reading every file
    # to hash it would cost as much as decoding it.
    return file_fingerprint(item)


def _digest(*parts) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
    return digest.digest()


# ----------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------

_EXPECTED = (
    "{argument} must be images: an array of shape (n, H, W), (n, H, W, 1) or "
    "(n, H, W, 3), flat rows (n, H*W) with image_shape, or a list of image file paths, "
    "PIL images or arrays"
)


def _expected(argument: str) -> str:
    return _EXPECTED.format(argument=argument)


def as_image_source(
    X,
    image_shape: tuple[int, ...] | None = None,
    value_range: tuple[float, float] | None = None,
    argument: str = "X",
) -> ImageSource:
    """Validate ``X`` and wrap it as an image source, without copying the pixels.

    Parameters
    ----------
    X : array-like or list
        See :data:`_EXPECTED` for the accepted forms.
    image_shape : tuple (H, W) or (H, W, C), optional
        Shape of one image when ``X`` holds flat rows.
    value_range : (low, high), optional
        Pixel values that mean black and white. Default: (0, 255) for integer
        arrays and files, (0, 1) for float arrays.
    argument : str, default="X"
        The name of ``X`` in error messages (``"X_target"``, say).

    Raises
    ------
    TypeError
        ``X`` is not one of the accepted kinds of objects.
    ValueError
        ``X`` is empty, has the wrong shape or channel count, holds NaN, infinity or
        values outside ``value_range``, or names a missing file.
    """
    if isinstance(X, ImageSource):
        return X
    expected = _expected(argument)
    if isinstance(X, (str, os.PathLike)):
        raise TypeError(f"{expected}; got a single path {str(X)!r}: wrap it in a list")
    if isinstance(X, Image.Image):
        raise TypeError(f"{expected}; got a single PIL image: wrap it in a list")
    if isinstance(X, torch.Tensor):
        raise TypeError(
            f"{expected}; got a torch.Tensor. Convert it to a NumPy array in channels-last "
            f"layout, e.g. {argument}.permute(0, 2, 3, 1).numpy() for an (n, C, H, W) tensor"
        )
    if image_shape is not None:
        image_shape = check_image_shape(image_shape)
    if isinstance(X, (list, tuple)) and len(X) and _is_image_item(X[0]):
        return _list_source(list(X), value_range, argument)
    if isinstance(X, (set, dict)) or X is None or np.isscalar(X):
        raise TypeError(f"{expected}; got {type(X).__name__}")
    try:
        array = np.asarray(X)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{expected}; got {type(X).__name__} ({exc})") from exc
    return _array_source(array, image_shape, value_range, argument)


def is_dask_array(X) -> bool:
    """Tell whether ``X`` is a ``dask.array.Array`` (without importing Dask)."""
    return type(X).__module__.startswith("dask.array") and hasattr(X, "chunks")


def _is_image_item(item) -> bool:
    return isinstance(item, (str, os.PathLike, Image.Image, np.ndarray))


def _array_source(array, image_shape, value_range, argument) -> ArraySource:
    if array.dtype.kind not in "uif":
        raise TypeError(f"{_expected(argument)}; got an array of dtype {array.dtype}")
    if array.size == 0:
        raise ValueError(f"{argument} is empty: got an array of shape {array.shape}")
    if array.ndim == 2:
        images = _unflatten(array, image_shape, argument)
    elif array.ndim == 3:
        if array.shape[-1] == 3 and image_shape is None:
            raise ValueError(
                f"{argument} of shape {array.shape} looks like one RGB image, not a batch; "
                f"pass {argument}[np.newaxis] for one image"
            )
        images = array[..., None]
    elif array.ndim == 4:
        if array.shape[-1] not in (1, 3):
            hint = (
                "; it looks channels-first: use X.transpose(0, 2, 3, 1)"
                if array.shape[1] in (1, 3)
                else ""
            )
            raise ValueError(
                f"{argument} must have 1 or 3 channels in its last axis (n, H, W, C); "
                f"got an array of shape {array.shape}{hint}"
            )
        images = array
    else:
        raise ValueError(f"{_expected(argument)}; got an array of shape {array.shape}")
    if image_shape is not None and array.ndim > 2:
        _check_image_shape_matches(images, image_shape, argument)
    return ArraySource(images, _check_values(images, value_range, argument))


def check_image_shape(image_shape) -> tuple[int, ...]:
    """Check the ``image_shape`` parameter; return it as a tuple of ints.

    Valid shapes are ``(H, W)`` or ``(H, W, C)`` with positive H and W and C in (1, 3).
    """
    message = (
        "image_shape must be (H, W) or (H, W, C) with positive H and W and C in (1, 3); "
        f"got {image_shape!r}"
    )
    if not isinstance(image_shape, (tuple, list)) or len(image_shape) not in (2, 3):
        raise ValueError(message)
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in image_shape):
        raise ValueError(message)
    shape = tuple(int(v) for v in image_shape)
    if min(shape[:2]) < 1 or (len(shape) == 3 and shape[2] not in (1, 3)):
        raise ValueError(message)
    return shape


def _unflatten(array: np.ndarray, image_shape, argument: str) -> np.ndarray:
    if image_shape is None:
        raise ValueError(
            f"{argument} is 2-D with shape {array.shape}: flat rows need image_shape=(H, W) "
            "or (H, W, C), e.g. image_shape=(8, 8) for load_digits().data"
        )
    if math.prod(image_shape) != array.shape[1]:
        raise ValueError(
            f"image_shape={image_shape!r} holds {math.prod(image_shape)} pixels but the rows "
            f"of {argument} have {array.shape[1]} values"
        )
    shape = image_shape if len(image_shape) == 3 else (*image_shape, 1)
    return array.reshape(len(array), *shape)


def _check_image_shape_matches(images: np.ndarray, image_shape, argument: str) -> None:
    actual = images.shape[1:] if len(image_shape) == 3 else images.shape[1:3]
    if tuple(actual) != image_shape:
        raise ValueError(
            f"image_shape={image_shape!r} does not match {argument}'s images of shape {actual}"
        )


def _check_values(pixels: np.ndarray, value_range, name: str) -> tuple[float, float]:
    """Check for NaN, infinity and range; return the value range the pixels use."""
    is_float = pixels.dtype.kind == "f"
    default = UNIT_RANGE if is_float else UINT8_RANGE
    if value_range is not None:
        low, high = (float(v) for v in value_range)
    else:
        low, high = default
    if pixels.dtype == np.uint8 and (low, high) == UINT8_RANGE:
        return UINT8_RANGE
    lowest, highest = _min_max(pixels)
    if not (np.isfinite(lowest) and np.isfinite(highest)):
        raise ValueError(f"{name} contains NaN or infinity")
    if lowest < low or highest > high:
        kind = "float" if is_float else "integer"
        advice = (
            f"pass value_range=({_fmt(lowest)}, {_fmt(highest)}) if that is the range of "
            "your pixels, or rescale them"
            if value_range is None
            else "fix value_range or the pixels"
        )
        raise ValueError(
            f"{name} holds values in [{_fmt(lowest)}, {_fmt(highest)}] but {kind} pixels "
            f"must lie in value_range=({_fmt(low)}, {_fmt(high)}); {advice}"
        )
    return (low, high)


def _min_max(pixels: np.ndarray) -> tuple[float, float]:
    """Minimum and maximum (NaN if any NaN), scanning big arrays block by block."""
    rows = max(1, _SCAN_BLOCK_BYTES // max(1, pixels[0].nbytes))
    lows, highs = [], []
    for start in range(0, len(pixels), rows):
        block = pixels[start : start + rows]
        lows.append(block.min())
        highs.append(block.max())
    return float(np.min(lows)), float(np.max(highs))


def _fmt(value: float) -> str:
    return f"{value:g}"


def _list_source(items: list, value_range, argument: str) -> ListSource:
    value_ranges = []
    for index, item in enumerate(items):
        where = f"{argument}[{index}]"
        if isinstance(item, (str, os.PathLike)):
            if not os.path.isfile(item):
                raise ValueError(f"{where}: image file {str(item)!r} does not exist")
            value_ranges.append(UINT8_RANGE)
        elif isinstance(item, Image.Image):
            value_ranges.append(UINT8_RANGE)
        elif isinstance(item, np.ndarray):
            _check_single_image(item, where)
            value_ranges.append(_check_values(item[None], value_range, where))
        else:
            raise TypeError(
                f"{_expected(argument)}; {where} is a {type(item).__name__}, while "
                f"{argument}[0] is a {type(items[0]).__name__}"
            )
    return ListSource([str(i) if isinstance(i, Path) else i for i in items], value_ranges)


def _check_single_image(item: np.ndarray, where: str) -> None:
    if item.dtype.kind not in "uif":
        raise TypeError(f"{where} must be a numeric image array; got dtype {item.dtype}")
    if item.size == 0:
        raise ValueError(f"{where} is empty: got an array of shape {item.shape}")
    if item.ndim not in (2, 3) or (item.ndim == 3 and item.shape[2] not in (1, 3)):
        raise ValueError(
            f"{where} must be one image of shape (H, W), (H, W, 1) or (H, W, 3); "
            f"got an array of shape {item.shape}"
        )


def load_npy(path: str) -> np.ndarray:
    """Memory-map a .npy array of images (never unpickling it)."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:  # object arrays can be neither mapped nor safely loaded
        raise ValueError(
            f"INPUT: {path} holds Python objects (an array of dtype object), not pixels; "
            "expected a numeric array of images (n, H, W[, C]) as np.save(path, images) "
            "writes"
        ) from exc
    except OSError as exc:
        raise OSError(f"INPUT: could not read {path} as a .npy file: {exc}") from exc
