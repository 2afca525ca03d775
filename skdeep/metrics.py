"""Scorers that need no target labels, for choosing domain-adaptation settings.

A scikit-learn user tunes with ``GridSearchCV``; target labels are what a domain
adaptation user does not have. These scorers judge a fitted classifier by its
unlabeled target rows (``y == -1``, as in :class:`~skdeep.DomainAdaptedClassifier`)
and, for deep embedded validation, its labeled source rows, so they plug into
``GridSearchCV(scoring=...)`` and ``cross_val_score`` with row-aligned data::

    from sklearn.model_selection import GridSearchCV
    from skdeep.metrics import PredictionEntropyScorer

    search = GridSearchCV(
        DomainAdaptedClassifier(image_size=32, max_epochs=4),
        {"divergence_weight": [0.3, 1.0, 3.0]},
        scoring=PredictionEntropyScorer(),
    ).fit(X, y)  # X: source and target images; y: labels, -1 for target rows

Every scorer returns a number where greater is better, as scikit-learn expects.

- :class:`PredictionEntropyScorer`: minus the mean entropy of the target predictions
  (confident predictions on the target).
- :class:`SoftNeighborhoodDensityScorer`: the soft neighbourhood density of Saito et
  al. (ICCV 2021): target predictions that form dense, consistent neighbourhoods.
- :class:`DeepEmbeddedValidationScorer`: minus the deep embedded validation risk of
  You et al. (ICML 2019): the loss on held-out labeled source rows, weighted by how
  target-like each row's features are, with a control variate.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ._labels import check_labels, check_sample_domain, class_codes, unlabeled_rows

__all__ = [
    "DeepEmbeddedValidationScorer",
    "PredictionEntropyScorer",
    "SoftNeighborhoodDensityScorer",
    "deep_embedded_validation",
    "prediction_entropy",
    "soft_neighborhood_density",
]


def _check_probabilities(probabilities, argument: str = "probabilities") -> np.ndarray:
    """Rows of class probabilities as a float64 array ``(n, k)``.

    Raises
    ------
    ValueError
        Not 2-D, empty, not finite, or outside [0, 1].
    """
    try:
        p = np.asarray(probabilities, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{argument} must be numbers; got {type(probabilities).__name__}") from exc
    if p.ndim != 2 or not p.size:
        raise ValueError(
            f"{argument} must be a 2-D array (n_rows, n_classes) of class probabilities; got "
            f"an array of shape {p.shape}"
        )
    if not np.isfinite(p).all():
        raise ValueError(
            f"{argument} must hold probabilities, finite and in [0, 1]; got NaN or inf"
        )
    if p.min() < 0 or p.max() > 1:
        raise ValueError(
            f"{argument} must hold probabilities, finite and in [0, 1]; got values in "
            f"[{p.min():g}, {p.max():g}]"
        )
    return p


def _check_positive(value, argument: str) -> float:
    """Return ``value`` as a float if positive and finite; else raise naming ``argument``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"{argument} must be a positive number; got {value!r}")
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"{argument} must be a positive finite number; got {value!r}")
    return float(value)


def prediction_entropy(probabilities: np.ndarray) -> float:
    """Mean entropy (in nats) of rows of class probabilities."""
    p = np.clip(_check_probabilities(probabilities), 1e-12, 1.0)
    return float(-(p * np.log(p)).sum(axis=1).mean())


def soft_neighborhood_density(probabilities: np.ndarray, temperature: float = 0.05) -> float:
    """Soft neighbourhood density of predictions (Saito et al., 2021).

    Each row's L2-normalised probabilities are compared with every other row's; a
    softmax at ``temperature`` over these similarities (self left out) gives each row a
    distribution over its neighbours, whose entropy is high when it sits in a dense
    cluster of like predictions. Returns the mean entropy.
    """
    p = _check_probabilities(probabilities)
    temperature = _check_positive(temperature, "temperature")
    if len(p) < 2:
        raise ValueError(f"soft neighbourhood density needs 2 rows or more; got {len(p)}")
    p = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    similarity = p @ p.T / temperature
    np.fill_diagonal(similarity, -np.inf)
    similarity -= similarity.max(axis=1, keepdims=True)
    neighbours = np.exp(similarity)
    neighbours /= neighbours.sum(axis=1, keepdims=True)
    return float(-(neighbours * np.log(np.clip(neighbours, 1e-300, None))).sum(axis=1).mean())


def deep_embedded_validation(losses: np.ndarray, weights: np.ndarray) -> float:
    """Deep embedded validation risk (You et al., 2019): an importance-weighted loss.

    Parameters
    ----------
    losses : array of shape (n,)
        The classifier's loss on each held-out labeled source row.
    weights : array of shape (n,)
        Each row's density ratio p_target(x) / p_source(x) (from a domain classifier).

    Returns
    -------
    float
        ``mean(w L) + eta * mean(w) - eta`` with the control variate
        ``eta = -cov(w L, w) / var(w)``, which lowers the estimate's variance.
    """
    losses, weights = np.asarray(losses, float), np.asarray(weights, float)
    if losses.ndim != 1 or weights.shape != losses.shape or not len(losses):
        raise ValueError(
            "losses and weights must be 1-D arrays of one length, one entry per row; got "
            f"shapes {losses.shape} and {weights.shape}"
        )
    if not (np.isfinite(losses).all() and np.isfinite(weights).all()) or weights.min() < 0:
        raise ValueError("losses must be finite and weights finite and non-negative")
    weighted = weights * losses
    variance = np.var(weights, ddof=1) if len(weights) > 1 else 0.0
    eta = -np.cov(weighted, weights)[0, 1] / variance if variance > 0 else 0.0
    return float(weighted.mean() + eta * weights.mean() - eta)


class _UnlabeledTargetScorer:
    """Split a scorer's rows into labeled source rows and unlabeled target rows."""

    def _rows(self, estimator, X, y, sample_domain, needs=("predict_proba",)):
        missing = [method for method in needs if not hasattr(estimator, method)]
        if missing:
            raise TypeError(
                f"estimator must be a fitted classifier with {' and '.join(needs)}; "
                f"{type(estimator).__name__} has no {missing[0]}"
            )
        source = X if isinstance(X, (list, tuple)) else np.asarray(X)
        if not isinstance(source, (list, tuple)) and source.ndim == 0:
            raise ValueError(f"X must be images, one per row; got {type(X).__name__}")
        y = check_labels(np.zeros(len(source)) if y is None else y, len(source))
        if sample_domain is not None:
            target = check_sample_domain(sample_domain, len(source)) < 0
        else:
            target = unlabeled_rows(y)
        if target.sum() < 2:
            raise ValueError(
                f"{type(self).__name__} needs at least two target rows (y == -1, or "
                f"sample_domain < 0) among the rows it scores; got {int(target.sum())}"
            )
        return source, y, target


class PredictionEntropyScorer(_UnlabeledTargetScorer):
    """Score: minus the mean entropy of the predictions on the target rows.

    Confident target predictions score higher. Greater is better.
    """

    def __call__(self, estimator, X, y=None, sample_domain=None) -> float:
        """Score ``estimator`` on the target rows of ``X`` (``y == -1``)."""
        source, _, target = self._rows(estimator, X, y, sample_domain)
        proba = estimator.predict_proba(_subset(source, np.flatnonzero(target)))
        return -prediction_entropy(proba)


class SoftNeighborhoodDensityScorer(_UnlabeledTargetScorer):
    """Score: the soft neighbourhood density of the target predictions (greater is better).

    Parameters
    ----------
    temperature : float, default=0.05
        Temperature of the softmax over similarities (the paper's value).
    """

    def __init__(self, temperature: float = 0.05):
        self.temperature = temperature

    def __call__(self, estimator, X, y=None, sample_domain=None) -> float:
        """Score ``estimator`` on the target rows of ``X`` (``y == -1``)."""
        temperature = _check_positive(self.temperature, "temperature")
        source, _, target = self._rows(estimator, X, y, sample_domain)
        proba = estimator.predict_proba(_subset(source, np.flatnonzero(target)))
        return soft_neighborhood_density(proba, temperature)


class DeepEmbeddedValidationScorer(_UnlabeledTargetScorer):
    """Score: minus the deep embedded validation risk (greater is better).

    The classifier's cross-entropy on the labeled source rows it is scored on (held
    out from its fit, in cross-validation), each weighted by how target-like its
    features (``estimator.transform``) are: a logistic regression tells source from
    target features, its cross-validated probabilities give the density ratios.

    Parameters
    ----------
    n_splits : int, default=5
        Folds of the domain classifier's cross-validated predictions.
    random_state : int or None, default=0
        Seeds the domain classifier's folds.
    """

    def __init__(self, n_splits: int = 5, random_state: int | None = 0):
        self.n_splits = n_splits
        self.random_state = random_state

    def __call__(self, estimator, X, y=None, sample_domain=None) -> float:
        """Score ``estimator`` on the rows of ``X``: labeled source and unlabeled target."""
        if (
            isinstance(self.n_splits, (bool, np.bool_))
            or not isinstance(self.n_splits, (int, np.integer))
            or self.n_splits < 2
        ):
            raise ValueError(f"n_splits must be an integer of 2 or more; got {self.n_splits!r}")
        needs = ("predict_proba", "transform", "classes_")
        source, y, target = self._rows(estimator, X, y, sample_domain, needs)
        labeled = np.flatnonzero(~target & ~unlabeled_rows(y))
        if len(labeled) < 2:
            raise ValueError(
                "DeepEmbeddedValidationScorer needs labeled source rows among the rows it "
                f"scores; got {len(labeled)}"
            )
        rows = np.concatenate([labeled, np.flatnonzero(target)])
        features = estimator.transform(_subset(source, rows))
        domains = np.r_[np.zeros(len(labeled)), np.ones(len(rows) - len(labeled))]
        classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        folds = StratifiedKFold(self.n_splits, shuffle=True, random_state=self.random_state)
        p_target = cross_val_predict(
            classifier, features, domains, cv=folds, method="predict_proba"
        )[: len(labeled), 1]
        p_target = np.clip(p_target, 1e-6, 1 - 1e-6)
        ratio = len(labeled) / (len(rows) - len(labeled))
        weights = ratio * p_target / (1 - p_target)
        proba = estimator.predict_proba(_subset(source, labeled))
        codes = class_codes(estimator.classes_, y[labeled])
        losses = -np.log(np.clip(proba[np.arange(len(labeled)), codes], 1e-12, None))
        return -deep_embedded_validation(losses, weights)


def _subset(X, rows: np.ndarray):
    """Return the images of ``X`` (an array or a list) at ``rows``."""
    if isinstance(X, (list, tuple)):
        return [X[i] for i in rows]
    return X[rows]
