"""Label checks shared by the classifiers: length, unlabeled markers, class codes."""

from __future__ import annotations

import numpy as np
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import column_or_1d


def check_labels(y, n_images: int, argument: str = "y") -> np.ndarray:
    """``y`` as a 1-D array with one label per image.

    Raises
    ------
    ValueError
        ``y`` is not 1-D (or a column), or its length differs from ``n_images``.
    """
    y = np.asarray(y)
    if y.ndim != 1:
        y = column_or_1d(y, warn=True)
    if len(y) != n_images:
        raise ValueError(f"{argument} has {len(y)} labels but X has {n_images} images")
    return y


def unlabeled_rows(y: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows marked unlabeled: -1, or None / "-1" among strings."""
    if y.dtype.kind in "iuf":
        return y == -1
    if y.dtype.kind in "US":
        return y.astype(str) == "-1"
    return np.array(
        [
            value is None or (isinstance(value, (int, float, np.number)) and value == -1)
            for value in y
        ],
        dtype=bool,
    )


def encode_labels(y: np.ndarray, labeled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Classes of the ``labeled`` rows and integer codes of all rows (-1 elsewhere).

    Raises
    ------
    ValueError
        The labels are not class labels (floats, say), or there is a single class.
    """
    if not labeled.any():
        raise ValueError("y holds no labeled rows")
    check_classification_targets(y[labeled])
    classes, codes = np.unique(y[labeled], return_inverse=True)
    if len(classes) < 2:
        raise ValueError(
            # .tolist() turns NumPy scalars into Python ones: 0 or 'cat', not np.int64(0)
            f"y holds a single class ({classes.tolist()[0]!r} in every labeled row); a "
            "classifier needs at least two"
        )
    all_codes = np.full(len(y), -1, dtype=np.int64)
    all_codes[labeled] = codes
    return classes, all_codes
