"""Label checks shared by the classifiers and scorers: length, unlabeled rows, class codes.

:func:`unlabeled_rows` is the one rule that says which rows carry no label, for every
kind of label array scikit-learn takes (integers, floats, strings, objects, and what
pandas gives: nullable integers, strings, categories). ``DomainAdaptedClassifier.fit``
and ``score`` and the scorers of :mod:`skdeep.metrics` all ask it.
"""

from __future__ import annotations

from numbers import Number

import numpy as np
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import column_or_1d

UNLABELED = -1
"""The label that marks a row as unlabeled (also ``"-1"`` among strings)."""


def check_labels(y, n_images: int, argument: str = "y") -> np.ndarray:
    """``y`` as a 1-D NumPy array with one label per image.

    pandas Series and extension arrays (nullable integers, strings, categories) become
    NumPy arrays of their values; missing values stay missing (``None``, NaN or
    ``pd.NA``), which :func:`unlabeled_rows` counts as unlabeled.

    Raises
    ------
    ValueError
        ``y`` is not 1-D (or a column), or its length differs from ``n_images``.
    """
    if y is None:
        raise ValueError(f"{argument} is required: one label per image; got None")
    if not isinstance(getattr(y, "dtype", np.dtype(object)), np.dtype):
        # pandas' extension dtypes (nullable integers, strings, categories): their
        # values as objects, missing ones as pd.NA, so that integers stay integers.
        y = np.asarray(y, dtype=object)
    y = np.asarray(y)
    if y.ndim != 1:
        y = column_or_1d(y, warn=True)
    if len(y) != n_images:
        raise ValueError(f"{argument} has {len(y)} labels but X has {n_images} images")
    return y


def _is_unlabeled(value) -> bool:
    """Whether one label (of an object array) marks its row unlabeled."""
    if value is None:
        return True
    if isinstance(value, str):
        return value == "-1"
    if isinstance(value, bytes):
        return value == b"-1"
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, Number):
        return bool(value == UNLABELED or value != value)  # -1, or NaN (missing)
    return type(value).__name__ == "NAType"  # pandas.NA, without importing pandas


def unlabeled_rows(y: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows that carry no label.

    A row is unlabeled when its label is -1 (of any integer or float type), the
    string ``"-1"``, or missing (None, NaN, ``pandas.NA``), whatever the array's
    dtype: integer, float, string, or object (what pandas Series of strings,
    nullable integers or categories give).

    Parameters
    ----------
    y : ndarray of shape (n,)
        Labels, as :func:`check_labels` returns them.

    Returns
    -------
    ndarray of bool, shape (n,)
    """
    kind = y.dtype.kind
    if kind in "iu":
        return y == UNLABELED
    if kind == "f":
        return (y == UNLABELED) | np.isnan(y)
    if kind == "U":
        return y == "-1"
    if kind == "S":
        return y == b"-1"
    if kind == "O":
        return np.fromiter((_is_unlabeled(value) for value in y), dtype=bool, count=len(y))
    return np.zeros(len(y), dtype=bool)  # booleans, dates, ...: no marker


def labeled_values(y: np.ndarray) -> np.ndarray:
    """Return the labels of an object array in their natural dtype when all are numbers.

    pandas' nullable integers arrive as objects (Python ints among ``pd.NA``); once the
    unlabeled rows are left out, scikit-learn's label checks want an integer array.
    """
    if (
        y.dtype.kind == "O"
        and len(y)
        and all(
            isinstance(value, Number) and not isinstance(value, (bool, np.bool_)) for value in y
        )
    ):
        return np.asarray(y.tolist())
    return y


def encode_labels(y: np.ndarray, labeled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Classes of the ``labeled`` rows and integer codes of all rows (-1 elsewhere).

    Raises
    ------
    ValueError
        The labels are not class labels (floats, say), or there is a single class.
    """
    if not labeled.any():
        raise ValueError("y holds no labeled rows")
    values = labeled_values(y[labeled])
    check_classification_targets(values)
    classes, codes = np.unique(values, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(
            # .tolist() turns NumPy scalars into Python ones: 0 or 'cat', not np.int64(0)
            f"y holds a single class ({classes.tolist()[0]!r} in every labeled row); a "
            "classifier needs at least two"
        )
    all_codes = np.full(len(y), -1, dtype=np.int64)
    all_codes[labeled] = codes
    return classes, all_codes


def class_codes(classes: np.ndarray, values: np.ndarray, argument: str = "y") -> np.ndarray:
    """Codes of ``values`` among ``classes`` (their positions), whatever the two dtypes.

    Raises
    ------
    ValueError
        A value is not among ``classes``.
    """
    position = {label: code for code, label in enumerate(classes.tolist())}
    unknown = [value for value in values.tolist() if value not in position]
    if unknown:
        raise ValueError(
            f"{argument} holds labels the estimator was not fitted with: "
            f"{sorted(set(map(repr, unknown)))[:5]}; its classes are {classes.tolist()}"
        )
    return np.array([position[value] for value in values.tolist()], dtype=np.int64)


def check_sample_domain(sample_domain, n_images: int) -> np.ndarray:
    """``sample_domain`` as a 1-D integer array, one domain per image (>= 0 source, < 0 target).

    Raises
    ------
    ValueError
        It is not 1-D, its length differs from ``n_images``, or it holds no integers.
    """
    domains = np.asarray(sample_domain)
    if domains.ndim == 2 and domains.shape[1] == 1:
        domains = domains[:, 0]  # a column
    if domains.ndim != 1:
        raise ValueError(
            f"sample_domain must be 1-D, one domain per image; got an array of shape "
            f"{domains.shape}"
        )
    if len(domains) != n_images:
        raise ValueError(f"sample_domain has {len(domains)} entries but X has {n_images} images")
    if domains.dtype.kind not in "iu":
        raise ValueError(
            f"sample_domain must hold integers (>= 0 source, < 0 target); got dtype {domains.dtype}"
        )
    return domains
