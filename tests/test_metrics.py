"""Tests of skdeep.metrics: scorers that need no target labels."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin
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
    assert soft_neighborhood_density(clustered) == pytest.approx(np.log(3), rel=1e-3)


def test_soft_neighborhood_density_is_higher_for_consistent_predictions():
    """Greater is better: consistent clusters beat scattered or fragmented predictions.

    Target rows of two classes: a good model predicts two tight clusters; worse ones
    scatter their probabilities at random, or split each class over many classes.
    """
    rng = np.random.default_rng(0)
    truth = np.repeat([0, 1], 20)
    good = np.where(truth[:, None] == np.arange(2), 0.95, 0.05)
    scattered = rng.dirichlet(np.ones(2), size=40)
    fragmented = np.eye(10)[rng.integers(0, 10, 40)] * 0.9 + 0.01
    assert soft_neighborhood_density(good) > soft_neighborhood_density(scattered)
    assert soft_neighborhood_density(good) > soft_neighborhood_density(fragmented)
    assert prediction_entropy(good) < prediction_entropy(scattered)


class StubClassifier(ClassifierMixin, BaseEstimator):
    """A classifier of known quality on each domain, for ranking checks.

    Images carry their class in pixel ``[0, 0, 0]`` (0 or 255) and their domain in
    pixel ``[0, 0, 1]`` (0 source, 255 target). On a domain whose quality is "good",
    the predictions are right and confident; "bad", random probabilities.
    """

    def __init__(self, source_quality="good", target_quality="good"):
        self.source_quality = source_quality
        self.target_quality = target_quality

    def fit(self, X, y):
        """Record the classes of the labeled rows."""
        y = np.asarray(y)
        self.classes_ = np.unique(y[y != "-1"])
        return self

    def predict_proba(self, X):
        """Right and confident on "good" domains, random on "bad" ones."""
        X = np.asarray(X)
        truth = (X[:, 0, 0, 0] > 127).astype(int)
        target = X[:, 0, 0, 1] > 127
        p = np.where(truth[:, None] == np.arange(2), 0.95, 0.05)
        bad = np.where(target, self.target_quality, self.source_quality) == "bad"
        p[bad] = np.random.default_rng(int(X.sum()) % 2**32).dirichlet(np.ones(2), bad.sum())
        return p

    def predict(self, X):
        """Return the most probable class."""
        return self.classes_[self.predict_proba(X).argmax(1)]

    def transform(self, X):
        """Return a few pixels as features."""
        return np.asarray(X, dtype=float).reshape(len(X), -1)[:, :6]


def stub_rows(n: int = 40, seed: int = 0):
    """Return source rows labeled "a"/"b" and unlabeled target rows ("-1") for the stub."""
    rng = np.random.default_rng(seed)
    X = rng.integers(0, 256, (2 * n, 4, 4, 3)).astype(np.uint8)
    classes = rng.integers(0, 2, 2 * n)
    X[:, 0, 0, 0] = 255 * classes
    X[:, 0, 0, 1] = np.r_[np.zeros(n), np.full(n, 255)]
    y = np.r_[np.where(classes[:n] == 1, "b", "a"), np.full(n, "-1")]
    return X, y


@pytest.mark.parametrize(
    "scorer, worse",
    [
        (PredictionEntropyScorer(), dict(target_quality="bad")),
        (SoftNeighborhoodDensityScorer(), dict(target_quality="bad")),
        (DeepEmbeddedValidationScorer(), dict(source_quality="bad")),
    ],
)
def test_scorers_rank_the_better_model_higher(scorer, worse):
    """A model that is better where the scorer looks scores higher than a worse one."""
    X, y = stub_rows()
    better = StubClassifier().fit(X, y)
    worse_model = StubClassifier(**worse).fit(X, y)
    assert scorer(better, X, y) > scorer(worse_model, X, y)


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


def test_scorers_take_lists_of_images(fitted_and_rows):
    """A list of images scores as the array of the same images does."""
    clf, X, y = fitted_and_rows
    for scorer in (PredictionEntropyScorer(), SoftNeighborhoodDensityScorer()):
        assert scorer(clf, list(X), y) == pytest.approx(scorer(clf, X, y))


def test_entropy_scorer_is_minus_the_target_entropy(fitted_and_rows):
    """The entropy scorer equals minus the entropy of predict_proba on the target rows."""
    clf, X, y = fitted_and_rows
    expected = -prediction_entropy(clf.predict_proba(X[24:]))
    assert PredictionEntropyScorer()(clf, X, y) == pytest.approx(expected)


@pytest.mark.parametrize(
    "scorer, grid",
    [
        (PredictionEntropyScorer(), {"target_quality": ["bad", "good"]}),
        (SoftNeighborhoodDensityScorer(), {"target_quality": ["bad", "good"]}),
        (DeepEmbeddedValidationScorer(), {"source_quality": ["bad", "good"]}),
    ],
)
def test_grid_search_with_a_scorer_picks_the_better_model(scorer, grid):
    """GridSearchCV with a scorer chooses the candidate that is better where it looks.

    The worse candidate comes first, so a scorer that reads the wrong rows (a tie)
    or the wrong sign would choose it.
    """
    X, y = stub_rows()
    folds = KFold(2, shuffle=True, random_state=0)
    search = GridSearchCV(StubClassifier(), grid, scoring=scorer, cv=folds).fit(X, y)
    (name,) = grid
    assert search.best_params_[name] == "good"
    scores = search.cv_results_["mean_test_score"]
    assert scores[1] > scores[0]


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
    # Each fold's score is the scorer's on that fold's held-out rows.
    train, test = next(folds.split(X, y))
    model = DomainAdaptedClassifier(**tiny_training(max_epochs=1, divergence_weight=0.0))
    model.fit(X[train], y[train])
    expected = SoftNeighborhoodDensityScorer()(model, X[test], y[test])
    assert search.cv_results_["split0_test_snd"][0] == pytest.approx(expected)
    scores = cross_val_score(
        DomainAdaptedClassifier(**tiny_training(max_epochs=1)), X, y, cv=folds,
        scoring=PredictionEntropyScorer(),
    )  # fmt: skip
    assert (scores <= 0).all() and len(scores) == 2


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda clf, X, y: PredictionEntropyScorer()(clf, X, y, sample_domain=np.zeros(5, int)),
            "sample_domain has 5 entries but X has 80 images",
        ),
        (
            lambda clf, X, y: PredictionEntropyScorer()(clf, X, y[:-1]),
            "y has 79 labels but X has 80 images",
        ),
        (
            lambda clf, X, y: SoftNeighborhoodDensityScorer(temperature=0)(clf, X, y),
            "temperature must be a positive finite number; got 0",
        ),
        (
            lambda clf, X, y: DeepEmbeddedValidationScorer(n_splits=1)(clf, X, y),
            "n_splits must be an integer of 2 or more; got 1",
        ),
        (
            lambda clf, X, y: PredictionEntropyScorer()(object(), X, y),
            "estimator must be a fitted classifier with predict_proba; object has no",
        ),
        (
            lambda clf, X, y: prediction_entropy(np.ones(3)),
            r"probabilities must be a 2-D array .* got an array of shape \(3,\)",
        ),
        (
            lambda clf, X, y: soft_neighborhood_density(np.full((3, 2), np.nan)),
            "probabilities must hold probabilities, finite and in",
        ),
        (
            lambda clf, X, y: deep_embedded_validation(np.ones(3), np.ones(4)),
            r"losses and weights must be 1-D arrays of one length.* \(3,\) and \(4,\)",
        ),
    ],
)
def test_bad_scorer_inputs_are_named(call, message):
    """Scorer arguments are checked where they enter, with the argument named."""
    X, y = stub_rows()
    clf = StubClassifier().fit(X, y)
    with pytest.raises((ValueError, TypeError), match=message):
        call(clf, X, y)
