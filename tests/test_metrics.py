"""Tests of skdeep.metrics: scorers that need no target labels."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score

from skdeep import DomainAdaptedClassifier
from skdeep.metrics import (
    DeepEmbeddedValidationScorer,
    PredictionEntropyScorer,
    SoftNeighborhoodDensityScorer,
    deep_embedded_validation,
    prediction_entropy,
    soft_neighborhood_density,
)

from .conftest import separable_images, tiny_training


def test_prediction_entropy_by_hand():
    """Certain rows have entropy 0, uniform ones log(k)."""
    p = np.array([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    assert prediction_entropy(p) == pytest.approx(np.log(3) / 2)


def test_soft_neighborhood_density_against_a_loop():
    """The vectorised density equals a row-by-row computation of the paper's formula."""
    p = np.random.default_rng(0).dirichlet(np.ones(4), size=7)
    normed = p / np.linalg.norm(p, axis=1, keepdims=True)
    entropies = []
    for i in range(7):
        others = [j for j in range(7) if j != i]
        similarity = np.array([normed[i] @ normed[j] for j in others]) / 0.05
        weights = np.exp(similarity - similarity.max())
        weights /= weights.sum()
        entropies.append(-(weights * np.log(weights)).sum())
    assert soft_neighborhood_density(p) == pytest.approx(np.mean(entropies))
    # Two tight clusters: each row's neighbours are its own cluster, fewer than all rows.
    clustered = np.array([[1, 0]] * 4 + [[0, 1]] * 4, dtype=float)
    spread = np.random.default_rng(1).dirichlet(np.ones(2), size=8)
    assert soft_neighborhood_density(clustered) == pytest.approx(np.log(3), rel=1e-3)
    assert soft_neighborhood_density(spread) > 0


def test_deep_embedded_validation_by_hand():
    """Equal weights give the mean loss; otherwise the control variate formula."""
    losses = np.array([0.2, 1.0, 0.5, 0.1])
    assert deep_embedded_validation(losses, np.ones(4)) == pytest.approx(losses.mean())
    weights = np.array([0.5, 2.0, 1.0, 0.5])
    weighted = weights * losses
    eta = -np.cov(weighted, weights)[0, 1] / np.var(weights, ddof=1)
    expected = weighted.mean() + eta * weights.mean() - eta
    assert deep_embedded_validation(losses, weights) == pytest.approx(expected)


@pytest.fixture(scope="module")
def fitted_and_rows():
    """Fit a tiny adapter on row-aligned source and target rows; return it and the rows."""
    X_source, y_source = separable_images(n_per_class=12, size=24)
    X_target, _ = separable_images(n_per_class=12, size=24, seed=3)
    X = np.concatenate([X_source, 255 - X_target])
    y = np.concatenate([y_source, np.full(24, "-1")])
    clf = DomainAdaptedClassifier(**tiny_training(max_epochs=2)).fit(X, y)
    return clf, X, y


@pytest.mark.parametrize(
    "scorer",
    [PredictionEntropyScorer(), SoftNeighborhoodDensityScorer(), DeepEmbeddedValidationScorer()],
)
def test_scorers_read_target_rows_without_their_labels(fitted_and_rows, scorer):
    """Scorers use the unlabeled rows; target labels, if any, change nothing."""
    clf, X, y = fitted_and_rows
    value = scorer(clf, X, y)
    assert np.isfinite(value)
    domains = np.r_[np.zeros(24, int), -np.ones(24, int)]
    labeled_target = np.where(domains < 0, np.tile(["horizontal", "vertical"], 24), y)
    assert scorer(clf, X, labeled_target, sample_domain=domains) == pytest.approx(value)
    with pytest.raises(ValueError, match="needs at least two target rows"):
        scorer(clf, X[:24], y[:24])


def test_entropy_scorer_is_minus_the_target_entropy(fitted_and_rows):
    """The entropy scorer equals minus the entropy of predict_proba on the target rows."""
    clf, X, y = fitted_and_rows
    expected = -prediction_entropy(clf.predict_proba(X[24:]))
    assert PredictionEntropyScorer()(clf, X, y) == pytest.approx(expected)


def test_scorers_plug_into_grid_search_and_cross_validation():
    """GridSearchCV and cross_val_score take the scorers, with target rows in every fold."""
    X_source, y_source = separable_images(n_per_class=12, size=24)
    X_target, _ = separable_images(n_per_class=12, size=24, seed=3)
    X = np.concatenate([X_source, 255 - X_target])
    y = np.concatenate([y_source, np.full(24, "-1")])
    folds = KFold(2, shuffle=True, random_state=0)
    search = GridSearchCV(
        DomainAdaptedClassifier(**tiny_training(max_epochs=1)),
        {"divergence_weight": [0.0, 1.0]},
        scoring={"snd": SoftNeighborhoodDensityScorer(), "dev": DeepEmbeddedValidationScorer()},
        refit="snd",
        cv=folds,
    ).fit(X, y)
    assert np.isfinite(search.cv_results_["mean_test_dev"]).all()
    scores = cross_val_score(
        DomainAdaptedClassifier(**tiny_training(max_epochs=1)), X, y, cv=folds,
        scoring=PredictionEntropyScorer(),
    )  # fmt: skip
    assert (scores <= 0).all() and len(scores) == 2
