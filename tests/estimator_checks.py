"""Estimator checks for image estimators.

scikit-learn's common checks that apply to image estimators, plus image versions
of the ones that feed tabular data (``parametrize_with_checks`` skips images).
"""

from __future__ import annotations

import io
import pickle

import joblib
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.utils import estimator_checks

APPLICABLE_SKLEARN_CHECKS = [
    "check_get_params_invariance",
    "check_set_params",
    "check_no_attributes_set_in_init",
    "check_parameters_default_constructible",
    "check_estimator_cloneable",
    "check_estimator_repr",
    "check_do_not_raise_errors_in_init_or_set_params",
    "check_param_validation",
    "check_mixin_order",
    "check_estimator_tags_renamed",
    "check_valid_tag_types",
]


def run_sklearn_checks(estimator) -> None:
    """Run the scikit-learn checks of :data:`APPLICABLE_SKLEARN_CHECKS` on ``estimator``."""
    name = type(estimator).__name__
    for check in APPLICABLE_SKLEARN_CHECKS:
        getattr(estimator_checks, check)(name, clone(estimator))


def check_image_estimator(estimator, X, y=None, method: str = "transform") -> None:
    """Clone, not-fitted error, fit returns self, params untouched, pickle round trip."""
    unfitted = clone(estimator)
    with pytest.raises(NotFittedError):
        getattr(unfitted, method)(X)

    fitted = clone(estimator)
    params = fitted.get_params(deep=False)
    assert fitted.fit(X, y) is fitted
    after = fitted.get_params(deep=False)
    assert set(after) == set(params)
    for key, value in params.items():
        assert after[key] is value, f"fit replaced the parameter {key}"

    expected = getattr(fitted, method)(X)
    for dumps, loads in [(pickle.dumps, pickle.loads), (_joblib_dumps, _joblib_loads)]:
        restored = loads(dumps(fitted))
        np.testing.assert_array_equal(getattr(restored, method)(X), expected)

    # A clone is unfitted and shares no fitted state.
    again = clone(fitted)
    assert not any(key.endswith("_") and not key.startswith("_") for key in vars(again))


def _joblib_dumps(obj) -> bytes:
    buffer = io.BytesIO()
    joblib.dump(obj, buffer)
    return buffer.getvalue()


def _joblib_loads(data: bytes):
    return joblib.load(io.BytesIO(data))
