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

from ._labels import check_labels, unlabeled_rows

__all__ = [
    "DeepEmbeddedValidationScorer",
    "PredictionEntropyScorer",
    "SoftNeighborhoodDensityScorer",
    "deep_embedded_validation",
    "prediction_entropy",
    "soft_neighborhood_density",
]


def prediction_entropy(probabilities: np.ndarray) -> float:
    """Mean entropy (in nats) of rows of class probabilities."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0)
    return float(-(p * np.log(p)).sum(axis=1).mean())


def soft_neighborhood_density(probabilities: np.ndarray, temperature: float = 0.05) -> float:
    """Soft neighbourhood density of predictions (Saito et al., 2021).

    Each row's L2-normalised probabilities are compared with every other row's; a
    softmax at ``temperature`` over these similarities (self left out) gives each row a
    distribution over its neighbours, whose entropy is high when it sits in a dense
    cluster of like predictions. Returns the mean entropy.
    """
    p = np.asarray(probabilities, dtype=np.float64)
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
    weighted = weights * losses
    variance = np.var(weights, ddof=1) if len(weights) > 1 else 0.0
    eta = -np.cov(weighted, weights)[0, 1] / variance if variance > 0 else 0.0
    return float(weighted.mean() + eta * weights.mean() - eta)


class _UnlabeledTargetScorer:
    """Split a scorer's rows into labeled source rows and unlabeled target rows."""

    def _rows(self, X, y, sample_domain):
        source = X if isinstance(X, (list, tuple)) else np.asarray(X)
        y = check_labels(np.zeros(len(source)) if y is None else y, len(source))
        if sample_domain is not None:
            target = np.asarray(sample_domain) < 0
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
        source, _, target = self._rows(X, y, sample_domain)
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
        source, _, target = self._rows(X, y, sample_domain)
        proba = estimator.predict_proba(_subset(source, np.flatnonzero(target)))
        return soft_neighborhood_density(proba, self.temperature)


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
        source, y, target = self._rows(X, y, sample_domain)
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
        codes = np.searchsorted(estimator.classes_, y[labeled])
        known = (codes < len(estimator.classes_)) & (
            estimator.classes_[np.minimum(codes, len(estimator.classes_) - 1)] == y[labeled]
        )
        if not known.all():
            raise ValueError("y holds labels the estimator was not fitted with")
        losses = -np.log(np.clip(proba[np.arange(len(labeled)), codes], 1e-12, None))
        return -deep_embedded_validation(losses, weights)


def _subset(X, rows: np.ndarray):
    """Return the images of ``X`` (an array or a list) at ``rows``."""
    if isinstance(X, (list, tuple)):
        return [X[i] for i in rows]
    return X[rows]
