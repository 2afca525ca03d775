"""Tests of the displays: what they draw equals the numbers they are made from."""

from __future__ import annotations

import sys

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from skdeep import (  # noqa: E402 (the Agg backend first)
    DomainAdaptedClassifier,
    DomainAlignmentDisplay,
    FeatureExtractor,
    FineTuneClassifier,
    LayerProbeDisplay,
    TrainingHistoryDisplay,
    layer_probe_scores,
)

from .conftest import TinyNet, separable_images, tiny_training  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    """Close every figure a test opened."""
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


@pytest.fixture(scope="module")
def domains():
    """Source images with labels, and target images (their negatives) with labels."""
    X_source, y_source = separable_images(n_per_class=12, size=24)
    X_target, y_target = separable_images(n_per_class=10, size=24, seed=3)
    return X_source, y_source, 255 - X_target, y_target


def test_training_history_plots_history(domains):
    """Each curve's points are the history's numbers; divergence and prediction losses apart."""
    X_source, y_source, X_target, _ = domains
    clf = DomainAdaptedClassifier(
        **tiny_training(early_stopping=True, max_epochs=3),
        information_weight=0.3,
        class_confusion_weight=1.0,
    )
    clf.fit(X_source, y_source, X_target=X_target)
    display = TrainingHistoryDisplay.from_estimator(clf)
    assert [axes.get_title().split(": ")[-1] for axes in display.ax_] == [
        "loss", "accuracy", "learning rate", "divergence", "prediction losses (target)"
    ]  # fmt: skip
    assert display.ax_[4].get_legend() is not None  # both prediction losses
    assert display.ax_[3].get_ylabel() == "mmd"  # a lone curve is named on its axis
    keys = ("train_loss", "valid_loss", "valid_accuracy", "lr", "mmd", "information",
            "class_confusion")  # fmt: skip
    for key in keys:
        x, y = display.lines_[key].get_data()
        np.testing.assert_array_equal(x, [r["epoch"] for r in clf.history_])
        np.testing.assert_allclose(y, [r[key] for r in clf.history_])
    plain = FineTuneClassifier(**tiny_training(max_epochs=2)).fit(X_source, y_source)
    assert len(TrainingHistoryDisplay.from_estimator(plain).ax_) == 3  # no divergence
    import matplotlib.pyplot as plt

    _, axes = plt.subplots(1, 2)
    with pytest.raises(ValueError, match="ax must hold 3 axes for this display; got 2"):
        TrainingHistoryDisplay.from_estimator(plain, ax=axes)


def test_domain_alignment_draws_every_image_by_domain_and_class(domains):
    """One point per image, blue source and orange target, before and after adaptation."""
    X_source, y_source, X_target, y_target = domains
    adapted = DomainAdaptedClassifier(**tiny_training(max_epochs=1))
    adapted.fit(X_source, y_source, X_target=X_target)
    plain = FineTuneClassifier(**tiny_training(max_epochs=1)).fit(X_source, y_source)
    display = DomainAlignmentDisplay.from_estimator(
        adapted, X_source, X_target, y_source, y_target, source_only=plain
    )
    assert len(display.ax_) == 2 and [a.get_title() for a in display.ax_] == [
        "source only", "adapted"
    ]  # fmt: skip
    for scatters in display.scatters_:
        counts = {domain: 0 for domain in ("source", "target")}
        for (domain, _label), collection in scatters.items():
            counts[domain] += len(collection.get_offsets())
            colour = collection.get_facecolor()[0][:3]
            expected = matplotlib.colors.to_rgb("tab:blue" if domain == "source" else "tab:orange")
            np.testing.assert_allclose(colour, expected)
        assert counts == {"source": len(X_source), "target": len(X_target)}
    assert len(display.scatters_[1]) == 4  # two domains x two classes
    np.testing.assert_allclose(display.embeddings[1].mean(0), 0, atol=1e-4)  # PCA centres
    with pytest.raises(TypeError, match="projection must be a transformer with fit_transform"):
        DomainAlignmentDisplay.from_estimator(adapted, X_source, X_target, projection=3)


def test_layer_probe_draws_one_bar_per_layer():
    """Bars are the mean cross-validated scores of the helper, one per layer."""
    X, y = separable_images(n_per_class=15, size=16)
    extractor = FeatureExtractor(TinyNet(), image_size=16, precision="float32")
    layers = ["features.0", "features.3", "penultimate"]
    scores = layer_probe_scores(extractor, X, y, layers=layers, cv=3)
    assert list(scores) == layers and all(len(s) == 3 for s in scores.values())
    display = LayerProbeDisplay(scores).plot()
    heights = [bar.get_height() for bar in display.bars_]
    np.testing.assert_allclose(heights, [np.mean(scores[layer]) for layer in layers])
    assert [t.get_text() for t in display.ax_.get_xticklabels()] == layers
    again = LayerProbeDisplay.from_estimator(extractor, X, y, layers=layers, cv=3)
    np.testing.assert_allclose([b.get_height() for b in again.bars_], heights)
    with pytest.raises(ValueError, match="layers: name the layers to compare"):
        layer_probe_scores(extractor, X, y)


def test_without_matplotlib_the_error_says_how_to_install_it(domains, monkeypatch):
    """The plot extra is optional: its absence is a clear ImportError."""
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r'pip install "skdeep\[plot\]"'):
        LayerProbeDisplay({"a": [0.5, 0.6]}).plot()
