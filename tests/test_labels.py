"""Tests of skdeep._labels: one rule for unlabeled rows, for every kind of label array."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skdeep import DomainAdaptedClassifier
from skdeep._labels import check_labels, check_sample_domain, encode_labels, unlabeled_rows

from .conftest import separable_images, tiny_training


def _containers(values: list, marked: list[bool], kind: str):
    """Labels ``values`` with the ``marked`` rows unlabeled, as one kind of array."""
    if kind in ("int", "float", "int object", "Int64", "Int64 missing", "float missing"):
        labels = [None if m else int(v) for v, m in zip(values, marked, strict=True)]
        marker = None if kind.endswith("missing") else -1
        filled = [marker if label is None else label for label in labels]
        return {
            "int": lambda: np.array(filled, dtype=np.int64),
            "float": lambda: np.array(filled, dtype=np.float64),
            "int object": lambda: np.array(filled, dtype=object),
            "Int64": lambda: pd.Series(filled, dtype="Int64"),
            "Int64 missing": lambda: pd.Series(filled, dtype="Int64"),
            "float missing": lambda: pd.Series(filled, dtype="float64"),
        }[kind]()
    text = ["-1" if m else f"class {v}" for v, m in zip(values, marked, strict=True)]
    return {
        "str": lambda: np.array(text),
        "str object": lambda: np.array(text, dtype=object),
        "pandas str": lambda: pd.Series(text),
        "pandas string": lambda: pd.Series(text, dtype="string"),
        "pandas category": lambda: pd.Series(text, dtype="category"),
        "pandas object": lambda: pd.Series(text, dtype=object),
    }[kind]()


KINDS = [
    "int", "float", "int object", "Int64", "Int64 missing", "float missing",
    "str", "str object", "pandas str", "pandas string", "pandas category", "pandas object",
]  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(
    rows=st.lists(st.tuples(st.integers(0, 3), st.booleans()), min_size=1, max_size=40),
    kind=st.sampled_from(KINDS),
)
def test_one_rule_finds_the_unlabeled_rows_of_every_kind_of_label_array(rows, kind):
    """-1, "-1" and missing values mark the same rows whatever the array holding them."""
    values, marked = [v for v, _ in rows], [m for _, m in rows]
    y = check_labels(_containers(values, marked, kind), len(rows))
    np.testing.assert_array_equal(unlabeled_rows(y), marked)
    labeled = ~np.asarray(marked)
    if len({v for v, m in rows if not m}) < 2:
        return
    classes, codes = encode_labels(y, labeled)
    assert len(classes) == len({v for v, m in rows if not m})
    assert (codes[~labeled] == -1).all() and (codes[labeled] >= 0).all()
    if kind in ("int", "float", "int object", "Int64", "Int64 missing", "float missing"):
        assert classes.dtype.kind in "iuf"  # numbers, not objects
    if kind in ("int", "int object", "Int64", "Int64 missing"):
        assert classes.dtype.kind in "iu"  # integers stay integers


def test_neither_booleans_nor_zeros_are_unlabeled():
    """Only -1, "-1" and missing values mark rows: False, 0, "" and "1" do not."""
    assert not unlabeled_rows(np.array([False, True])).any()
    y = np.array([0, "", "1", False, -1.0, np.int8(-1), b"-1", float("nan")], dtype=object)
    np.testing.assert_array_equal(unlabeled_rows(y), [0, 0, 0, 0, 1, 1, 1, 1])


def test_label_and_domain_lengths_are_checked():
    """Arrays of the wrong length or kind name the argument and what came."""
    with pytest.raises(ValueError, match="y has 2 labels but X has 3 images"):
        check_labels([0, 1], 3)
    with pytest.raises(ValueError, match="y is required: one label per image; got None"):
        check_labels(None, 3)
    with pytest.raises(ValueError, match="sample_domain has 2 entries but X has 3 images"):
        check_sample_domain([0, -1], 3)
    with pytest.raises(ValueError, match=r"sample_domain must hold integers .* got dtype <U1"):
        check_sample_domain(["a", "b", "c"], 3)
    with pytest.raises(ValueError, match=r"sample_domain must be 1-D.* shape \(3, 2\)"):
        check_sample_domain(np.zeros((3, 2), int), 3)


@pytest.mark.parametrize(
    "as_labels",
    [
        lambda y: pd.Series(y, dtype=object),
        lambda y: pd.Series(y, dtype="string"),
        lambda y: pd.Series(np.where(y == "-1", -1, np.where(y == "horizontal", 0, 1))).astype(
            "Int64"
        ),
    ],
    ids=["pandas object", "pandas string", "pandas Int64"],
)
def test_domain_adaptation_takes_pandas_labels_in_fit_and_score(as_labels):
    """Labels from pandas mark target rows as NumPy's do: fit trains, score skips them."""
    X_source, y_source = separable_images(n_per_class=8, size=24)
    X_target, _ = separable_images(n_per_class=8, size=24, seed=3)
    X = np.concatenate([X_source, 255 - X_target])
    y = as_labels(np.r_[y_source, np.full(16, "-1")])
    clf = DomainAdaptedClassifier(**tiny_training(max_epochs=1)).fit(X, y)
    assert len(clf.classes_) == 2 and "-1" not in clf.classes_.tolist()
    assert -1 not in clf.classes_.tolist()
    labeled = np.asarray(y)[:16]
    assert clf.score(X, y) == clf.score(X_source, labeled)
