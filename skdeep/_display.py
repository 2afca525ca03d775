"""Pictures of fitted estimators, in scikit-learn's Display style (matplotlib optional).

Each Display is made by a ``from_estimator`` class method (or from its numbers by its
constructor), draws with :meth:`plot`, and keeps what it drew as attributes ending in
``_``: ``figure_``, ``ax_`` and the artists. ``pip install "skdeep[plot]"`` brings
matplotlib.

- :class:`TrainingHistoryDisplay`: loss, accuracy, learning rate and the domain
  divergence per epoch, from ``history_``.
- :class:`DomainAlignmentDisplay`: source and target features projected to two
  dimensions, before and after adaptation.
- :class:`LayerProbeDisplay` and :func:`layer_probe_scores`: cross-validated accuracy of
  a linear probe on each tapped layer of a :class:`~skdeep.FeatureExtractor`.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import clone
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from ._compat import optional_import
from ._labels import check_labels

__all__ = [
    "DomainAlignmentDisplay",
    "LayerProbeDisplay",
    "TrainingHistoryDisplay",
    "layer_probe_scores",
]

# Records of history_ that are not the divergence.
_BASIC_RECORDS = (
    "epoch",
    "train_loss",
    "valid_loss",
    "train_accuracy",
    "valid_accuracy",
    "lr",
    "seconds",
)
# Records of the losses on the target images' predictions.
_PREDICTION_RECORDS = ("information", "class_confusion")


def _check_history(history) -> list[dict]:
    """Check ``history``: a non-empty list of per-epoch dicts, each with its ``epoch``."""
    if (
        not isinstance(history, (list, tuple))
        or not history
        or not all(isinstance(record, dict) and "epoch" in record for record in history)
    ):
        raise ValueError(
            "history must be a non-empty list of dicts, one per epoch with an 'epoch' "
            f"entry, as a fitted classifier's history_ holds; got {_describe(history)}"
        )
    return list(history)


def _describe(value) -> str:
    """Name what came, briefly: its type, and its length for sequences."""
    if isinstance(value, (list, tuple, dict, np.ndarray)):
        return f"a {type(value).__name__} of length {len(value)}"
    return repr(value) if value is None else f"a {type(value).__name__}"


def _check_transformer(estimator, argument: str) -> None:
    """Check that ``estimator`` is fitted and has ``transform``."""
    if not hasattr(estimator, "transform"):
        raise TypeError(
            f"{argument} must be a fitted estimator with transform (a "
            f"DomainAdaptedClassifier, say); got {type(estimator).__name__}"
        )
    check_is_fitted(estimator)


def _image_count(X, argument: str) -> int:
    """Return how many images ``X`` holds (a list, or an array of images)."""
    try:
        return len(X)
    except TypeError:
        raise TypeError(
            f"{argument} must be images (an array or a list); got {_describe(X)}"
        ) from None


def _pyplot():
    return optional_import("matplotlib.pyplot", "skdeep's displays", "plot")


def _axes(ax, count: int, width: float = 4.0):
    """Return the figure and ``count`` axes: new ones, or those given (checked)."""
    plt = _pyplot()
    if ax is None:
        figure, axes = plt.subplots(1, count, figsize=(width * count, 3.4), squeeze=False)
        return figure, axes[0]
    axes = np.atleast_1d(np.asarray(ax, dtype=object)).ravel()
    if len(axes) != count:
        raise ValueError(f"ax must hold {count} axes for this display; got {len(axes)}")
    return axes[0].figure, axes


class TrainingHistoryDisplay:
    """Training curves from the ``history_`` of a fitted classifier.

    Panels: the training and validation loss, the training and validation accuracy,
    the learning rate, and (for :class:`~skdeep.DomainAdaptedClassifier`) the domain
    divergence and the losses on the target predictions (information maximization,
    class confusion), each per epoch.

    Parameters
    ----------
    history : list of dict
        One record per epoch, as ``history_`` holds them.
    estimator_name : str, optional
        Shown in the first panel's title.

    Attributes
    ----------
    figure_ : matplotlib Figure
    ax_ : ndarray of matplotlib Axes
        One per panel.
    lines_ : dict of str to matplotlib Line2D
        The curve of each record (``"train_loss"``, ``"mmd"``, ...).
    """

    def __init__(self, history: list[dict], estimator_name: str | None = None):
        self.history = history
        self.estimator_name = estimator_name

    @classmethod
    def from_estimator(cls, estimator, ax=None) -> TrainingHistoryDisplay:
        """Draw the history of a fitted ``FineTuneClassifier`` or ``DomainAdaptedClassifier``."""
        if not hasattr(estimator, "max_epochs"):  # not a classifier that trains
            raise TypeError(
                "estimator must be a fitted FineTuneClassifier or DomainAdaptedClassifier "
                f"(it draws history_); got {type(estimator).__name__}"
            )
        check_is_fitted(estimator)
        return cls(estimator.history_, type(estimator).__name__).plot(ax=ax)

    def panels(self) -> list[tuple[str, list[str]]]:
        """Return the panels to draw: a title and its records, for the records present."""
        history = _check_history(self.history)
        present = set().union(*(record.keys() for record in history))
        divergences = sorted(present - set(_BASIC_RECORDS) - set(_PREDICTION_RECORDS))
        candidates = [
            ("loss", ["train_loss", "valid_loss"]),
            ("accuracy", ["train_accuracy", "valid_accuracy"]),
            ("learning rate", ["lr"]),
            ("divergence", divergences),
            ("prediction losses (target)", list(_PREDICTION_RECORDS)),
        ]
        return [
            (title, [key for key in keys if key in present])
            for title, keys in candidates
            if any(key in present for key in keys)
        ]

    def plot(self, ax=None) -> TrainingHistoryDisplay:
        """Draw the curves; ``ax`` may give one axes per panel."""
        panels = self.panels()
        if not panels:
            raise ValueError(
                "history holds nothing to draw: no train_loss, train_accuracy, lr or "
                f"divergence records; got the records {sorted(self.history[0])}"
            )
        self.figure_, self.ax_ = _axes(ax, len(panels))
        self.lines_ = {}
        epochs = [record["epoch"] for record in self.history]
        for axes, (title, keys) in zip(self.ax_, panels, strict=True):
            for key in keys:
                values = [record.get(key, np.nan) for record in self.history]
                (self.lines_[key],) = axes.plot(epochs, values, marker="o", label=key)
            axes.set_title(title)
            axes.set_xlabel("epoch")
            if len(keys) > 1:
                axes.legend()
            else:  # one curve: its name says which loss it is
                axes.set_ylabel(keys[0])
        if self.estimator_name:
            self.ax_[0].set_title(f"{self.estimator_name}: {panels[0][0]}")
        self.figure_.tight_layout()
        return self


class DomainAlignmentDisplay:
    """Source and target features in two dimensions, coloured by domain, marked by class.

    Parameters
    ----------
    embeddings : list of ndarray of shape (n_images, 2)
        One projection per panel (before and after adaptation, say), rows in the
        order of ``domains``.
    domains : ndarray of shape (n_images,)
        ``"source"`` or ``"target"`` for each row.
    labels : ndarray of shape (n_images,), optional
        Class of each row, shown as the marker (unknown target labels: None).
    titles : list of str, optional
        One per panel.

    Attributes
    ----------
    figure_ : matplotlib Figure
    ax_ : ndarray of matplotlib Axes
        One per panel.
    scatters_ : list of dict
        Per panel, the scatter of each (domain, class) pair drawn.
    """

    _MARKERS = "o^sPDv<>*Xhp"

    def __init__(self, embeddings, domains, labels=None, titles=None):
        self.embeddings = embeddings
        self.domains = domains
        self.labels = labels
        self.titles = titles

    @classmethod
    def from_estimator(
        cls,
        estimator,
        X_source,
        X_target,
        y_source=None,
        y_target=None,
        *,
        source_only=None,
        projection=None,
        ax=None,
    ) -> DomainAlignmentDisplay:
        """Project the features of ``estimator`` (and of ``source_only``) and draw them.

        Parameters
        ----------
        estimator : fitted estimator with ``transform``
            A :class:`~skdeep.DomainAdaptedClassifier`, say.
        X_source, X_target : images
            The images to show.
        y_source, y_target : array-like, optional
            Their classes (markers); target labels, when known, only mark points.
        source_only : fitted estimator with ``transform``, optional
            A model trained without adaptation: drawn first, side by side.
        projection : transformer with ``fit_transform``, default=PCA(n_components=2)
            Fitted anew (a clone) on each model's source and target features together.
        ax : matplotlib Axes or array of them, optional
            One per panel.
        """
        _check_transformer(estimator, "estimator")
        if source_only is not None:
            _check_transformer(source_only, "source_only")
        for labels, images, name in (
            (y_source, X_source, "source"),
            (y_target, X_target, "target"),
        ):
            count = _image_count(images, f"X_{name}")
            if labels is not None and (np.ndim(labels) != 1 or len(labels) != count):
                raise ValueError(
                    f"y_{name} must hold one label per image of X_{name} ({count}); got "
                    f"an array of shape {np.shape(labels)}"
                )
        models = [model for model in (source_only, estimator) if model is not None]
        projection = PCA(n_components=2) if projection is None else projection
        if not hasattr(projection, "fit_transform"):
            raise TypeError(
                f"projection must be a transformer with fit_transform, such as PCA or "
                f"TSNE; got {type(projection).__name__}"
            )
        embeddings = []
        for model in models:
            check_is_fitted(model)
            features = np.concatenate([model.transform(X_source), model.transform(X_target)])
            embedding = np.asarray(clone(projection).fit_transform(features))
            if embedding.ndim != 2 or embedding.shape[1] < 2:
                raise ValueError(
                    f"projection must give two dimensions; got an output of shape {embedding.shape}"
                )
            embeddings.append(embedding[:, :2])
        n_target = len(X_target)
        n_source = len(embeddings[0]) - n_target
        domains = np.array(["source"] * n_source + ["target"] * n_target)
        labels = None
        if y_source is not None or y_target is not None:
            labels = np.concatenate(
                [
                    np.asarray(y_source, dtype=object)
                    if y_source is not None
                    else np.full(n_source, None),
                    np.asarray(y_target, dtype=object)
                    if y_target is not None
                    else np.full(n_target, None),
                ]
            )
        titles = ["source only", "adapted"] if source_only is not None else ["features"]
        return cls(embeddings, domains, labels, titles).plot(ax=ax)

    def _check(self) -> None:
        """Check that embeddings, domains, labels and titles fit together."""
        domains = np.asarray(self.domains)
        if domains.ndim != 1 or not set(domains.tolist()) <= {"source", "target"}:
            raise ValueError(
                "domains must be a 1-D array of 'source' and 'target'; got "
                f"{sorted(set(map(str, domains.ravel().tolist())))[:4]}"
            )
        if not isinstance(self.embeddings, (list, tuple)) or not self.embeddings:
            raise ValueError(
                "embeddings must be a non-empty list of arrays (n_images, 2), one per "
                f"panel; got {_describe(self.embeddings)}"
            )
        for index, embedding in enumerate(self.embeddings):
            shape = np.shape(embedding)
            if len(shape) != 2 or shape[1] != 2 or shape[0] != len(domains):
                raise ValueError(
                    f"embeddings[{index}] must have shape ({len(domains)}, 2), one row per "
                    f"entry of domains; got {shape}"
                )
        if self.labels is not None and np.shape(self.labels) != (len(domains),):
            raise ValueError(
                f"labels must hold one label per row ({len(domains)}); got shape "
                f"{np.shape(self.labels)}"
            )
        if self.titles is not None and len(self.titles) != len(self.embeddings):
            raise ValueError(
                f"titles must hold one title per panel ({len(self.embeddings)}); got "
                f"{len(self.titles)}"
            )

    def plot(self, ax=None) -> DomainAlignmentDisplay:
        """Draw one scatter per panel: blue source, orange target, a marker per class."""
        self._check()
        self.figure_, self.ax_ = _axes(ax, len(self.embeddings), width=4.6)
        labels = self.labels if self.labels is not None else np.full(len(self.domains), None)
        classes = sorted({label for label in labels if label is not None}, key=str)
        markers = {label: self._MARKERS[i % len(self._MARKERS)] for i, label in enumerate(classes)}
        markers[None] = "."
        self.scatters_ = []
        for index, (axes, embedding) in enumerate(zip(self.ax_, self.embeddings, strict=True)):
            drawn = {}
            for domain, colour in (("source", "tab:blue"), ("target", "tab:orange")):
                for label in [*classes, None]:
                    rows = (self.domains == domain) & np.array([v == label for v in labels])
                    if rows.any():
                        drawn[(domain, label)] = axes.scatter(
                            embedding[rows, 0],
                            embedding[rows, 1],
                            c=colour,
                            marker=markers[label],
                            s=14,
                            alpha=0.6,
                            label=domain if label in (classes[:1] or [None]) else None,
                        )
            self.scatters_.append(drawn)
            if self.titles:
                axes.set_title(self.titles[index])
            axes.set_xticks([])
            axes.set_yticks([])
            axes.legend(loc="best")
        self.figure_.tight_layout()
        return self


def layer_probe_scores(extractor, X, y, layers=None, cv=5, classifier=None) -> dict:
    """Cross-validated accuracy of a linear probe on each tapped layer.

    The network runs once on ``X`` with every layer tapped; each layer's columns then
    train ``classifier`` (default: standardisation and a logistic regression) in
    ``cv``-fold cross-validation.

    Parameters
    ----------
    extractor : FeatureExtractor
        Its parameters say the network, weights, pooling and geometry (it is cloned,
        not changed).
    X : images
    y : array-like of shape (n_images,)
    layers : list of str, optional
        Layers to compare (default: the extractor's ``layers``, which must name
        several).
    cv : int or cross-validation splitter, default=5
    classifier : estimator, optional

    Returns
    -------
    dict
        Layer name (as given) to the array of its fold scores.
    """
    from .feature_extraction import FeatureExtractor  # the estimator module, where it is used

    if not isinstance(extractor, FeatureExtractor):
        raise TypeError(
            f"extractor must be a FeatureExtractor (its parameters say what to probe); got "
            f"{type(extractor).__name__}"
        )
    layers = extractor.layers if layers is None else layers
    if (
        not isinstance(layers, (list, tuple))
        or len(layers) < 1
        or not all(isinstance(layer, str) for layer in layers)
    ):
        raise ValueError(
            f"layers: name the layers to compare, as in layers=['layer2', 'layer4']; got {layers!r}"
        )
    y = check_labels(y, _image_count(X, "X"))
    if classifier is not None and not (hasattr(classifier, "fit") and hasattr(classifier, "score")):
        raise TypeError(
            f"classifier must be a scikit-learn classifier (fit and score); got "
            f"{type(classifier).__name__}"
        )
    probe = clone(extractor).set_params(layers=list(layers))
    features = probe.fit_transform(X)
    columns = _columns_of(probe.layers_, probe.get_feature_names_out())
    classifier = (
        make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        if classifier is None
        else classifier
    )
    return {
        requested: cross_val_score(clone(classifier), features[:, columns[name]], y, cv=cv)
        for requested, name in zip(layers, probe.layers_, strict=True)
    }


def _columns_of(layers: list[str], names) -> dict[str, np.ndarray]:
    """Each layer's columns: the names it prefixes (the longest such layer name wins)."""
    owners = []
    for name in names:
        matches = [layer for layer in layers if name.startswith(layer + "_")]
        owners.append(max(matches, key=len))
    owners = np.asarray(owners, dtype=object)
    return {layer: np.flatnonzero(owners == layer) for layer in layers}


class LayerProbeDisplay:
    """Bars of the cross-validated linear-probe accuracy of each layer, with its spread.

    Parameters
    ----------
    scores : dict
        Layer name to its fold scores (see :func:`layer_probe_scores`).

    Attributes
    ----------
    figure_ : matplotlib Figure
    ax_ : matplotlib Axes
    bars_ : matplotlib BarContainer
        One bar per layer, its height the mean score.
    """

    def __init__(self, scores: dict):
        self.scores = scores

    def _check(self) -> None:
        """Check ``scores``: layer names to non-empty 1-D arrays of finite numbers."""
        if not isinstance(self.scores, dict) or not self.scores:
            raise ValueError(
                "scores must be a non-empty dict of layer names to fold scores, as "
                f"layer_probe_scores returns; got {_describe(self.scores)}"
            )
        for name, values in self.scores.items():
            values = np.asarray(values)
            if values.ndim != 1 or not len(values) or values.dtype.kind not in "iuf":
                raise ValueError(
                    f"scores[{name!r}] must be a 1-D array of fold scores; got {values!r}"
                )

    @classmethod
    def from_estimator(
        cls, extractor, X, y, layers=None, cv=5, classifier=None, ax=None
    ) -> LayerProbeDisplay:
        """Compute :func:`layer_probe_scores` and draw them."""
        return cls(layer_probe_scores(extractor, X, y, layers, cv, classifier)).plot(ax=ax)

    def plot(self, ax=None) -> LayerProbeDisplay:
        """Draw one bar per layer (mean accuracy, the standard deviation as an error bar)."""
        self._check()
        self.figure_, (self.ax_,) = _axes(ax, 1, width=max(4.0, 1.1 * len(self.scores)))
        names = list(self.scores)
        means = [float(np.mean(self.scores[name])) for name in names]
        spreads = [float(np.std(self.scores[name], ddof=1)) if len(self.scores[name]) > 1 else 0.0
                   for name in names]  # fmt: skip
        self.bars_ = self.ax_.bar(range(len(names)), means, yerr=spreads, capsize=4)
        self.ax_.set_xticks(range(len(names)), names, rotation=30, ha="right")
        self.ax_.set_ylabel("linear probe accuracy (cross-validated)")
        self.ax_.set_ylim(0, 1)
        self.figure_.tight_layout()
        return self
