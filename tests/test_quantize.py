"""Tests of int8 feature extraction (post-training static quantization, FX mode)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from skdeep import FeatureExtractor, FineTuneClassifier, _quantize
from skdeep._base import NETWORK_BUILDS

from .conftest import needs_foolbox, needs_offline_weights


@pytest.fixture
def calibration():
    """Forty random 32x32 RGB images to calibrate on, and eight others to compare."""
    images = np.random.default_rng(0).integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)
    return images[:40], images[40:]


def int8_extractor(**params):
    """Return an int8 FeatureExtractor on a random ResNet-18 at 32 px, on the CPU (unfitted)."""
    defaults = dict(
        backbone="resnet18",
        weights=None,
        image_size=32,
        random_state=0,
        precision="int8",
        device="cpu",
    )
    return FeatureExtractor(**{**defaults, **params})


def cosine(a, b):
    """Return the cosine similarity of each row of ``a`` with the same row of ``b``."""
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_int8_needs_calibration_images():
    """fit() without images is an error that says why."""
    with pytest.raises(ValueError, match="precision='int8' needs calibration images"):
        int8_extractor().fit()


def varied_images(n: int, size: int = 32) -> np.ndarray:
    """Smooth random colour fields, unlike each other (random noise looks all alike)."""
    low = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (n, 3, 4, 4))).float()
    up = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic")
    return up.clamp(0, 255).round().byte().permute(0, 2, 3, 1).numpy()


def test_int8_features_follow_float32_features_on_every_layer(calibration):
    """Each int8 row is nearest to its own float32 row among 80 images.

    It is also much closer to it than unrelated images are to each other (their cosine
    is already about 0.94, so a cosine floor alone would let permuted rows pass).
    """
    train, _ = calibration
    test = varied_images(80)
    layers = ["layer2", "layer4", "penultimate"]
    quantized = int8_extractor(layers=layers, pooling="avgmax").fit(train)
    assert quantized.precision_ == torch.qint8
    assert any(".quantized." in type(m).__module__ for m in quantized.model_.modules())
    exact = int8_extractor(layers=layers, pooling="avgmax", precision="float32").fit(train)
    int8, float32 = quantized.transform(test), exact.transform(test)
    assert int8.shape == float32.shape and int8.dtype == np.float32
    assert quantized.get_feature_names_out().tolist() == exact.get_feature_names_out().tolist()
    assert not np.array_equal(int8, float32)
    similarity = cosine_matrix(int8, float32)
    assert (similarity.argmax(1) == np.arange(len(test))).all()
    unrelated = cosine_matrix(float32, float32)[~np.eye(len(test), dtype=bool)].mean()
    assert 1 - np.diag(similarity).min() < 0.1 * (1 - unrelated)


def cosine_matrix(a, b):
    """Cosine similarity of every row of ``a`` with every row of ``b``."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    return a @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T


def test_half_calibrated_networks_are_refused(calibration):
    """A calibration that lacks a statistic, or an observer that saw nothing, is an error."""
    train, _ = calibration
    extractor = int8_extractor().fit(train)
    prepared = extractor._prepared(extractor._build_network()[0], extractor.preprocessing_)
    complete = extractor._int8_calibration
    observer = next(key for key in complete if key.endswith("activation_post_process_3.min_val"))
    partial = {key: value for key, value in complete.items() if key != observer}
    with pytest.raises(
        ValueError,
        match=r"int8 calibration is incomplete: it lacks 1 .*"
        r"activation_post_process_3\.min_val",
    ):
        _quantize.convert(prepared, partial)
    blank = dict(complete, **{observer: torch.tensor(float("inf"))})
    prepared = extractor._prepared(extractor._build_network()[0], extractor.preprocessing_)
    with pytest.raises(
        ValueError, match=r"1 observers saw no data \(\['activation_post_process_3'"
    ):
        _quantize.convert(prepared, blank)


def test_int8_leaves_the_process_wide_quantized_engine_as_it_was(calibration):
    """The x86 engine is selected only while skdeep builds or runs an int8 network."""
    train, test = calibration
    before = torch.backends.quantized.engine
    candidates = [e for e in torch.backends.quantized.supported_engines if e not in ("x86", before)]
    if not candidates:
        pytest.skip("this PyTorch has no other quantized engine to select")
    torch.backends.quantized.engine = candidates[0]
    try:
        extractor = int8_extractor().fit(train)
        assert torch.backends.quantized.engine == candidates[0]
        extractor.transform(test)
        assert torch.backends.quantized.engine == candidates[0]
    finally:
        torch.backends.quantized.engine = before


def test_calibration_size_bounds_the_images_observed(calibration):
    """calibration_size picks that many images, spread over those given."""
    train, _ = calibration
    extractor = int8_extractor(calibration_size=10, batch_size=4)
    original, observed = extractor._input_batches, []

    def recorded(source, indices=None, dtype=torch.float32):
        observed.append(list(indices))
        return original(source, indices, dtype)

    extractor._input_batches = recorded
    extractor.fit(train)
    assert observed == [[0, 4, 9, 13, 17, 22, 26, 30, 35, 39]]


def test_pickles_hold_the_calibration_and_give_identical_features(calibration):
    """A pickle stores what calibration learned, rebuilds lazily, and matches exactly."""
    train, test = calibration
    extractor = int8_extractor().fit(train)
    expected = extractor.transform(test)
    state = extractor.__getstate__()
    assert "_int8_calibration" in state and "_model" not in state
    calibration_bytes = sum(
        t.numel() * t.element_size() for t in state["_int8_calibration"].values()
    )
    assert calibration_bytes < 2_000_000
    builds = sum(NETWORK_BUILDS.values())
    restored = pickle.loads(pickle.dumps(extractor))
    assert sum(NETWORK_BUILDS.values()) == builds  # nothing built on loading
    np.testing.assert_array_equal(restored.transform(test), expected)


def test_the_feature_cache_keeps_calibrations_apart(calibration, tmp_path):
    """Two calibrations of one network never share cached features."""
    train, test = calibration
    first = int8_extractor(memory=str(tmp_path)).fit(train[:20])
    second = int8_extractor(memory=str(tmp_path)).fit(255 - train[20:])
    assert first._feature_cache().settings_key != second._feature_cache().settings_key
    np.testing.assert_array_equal(first.transform(test), first.transform(test))
    assert not np.array_equal(first.transform(test), second.transform(test))


def test_int8_is_opt_in_and_cpu_only():
    """Never pick int8 for "auto"; fine-tuning refuses it, and so does CUDA."""
    assert FeatureExtractor(weights=None, image_size=32).fit().precision_ != torch.qint8
    with pytest.raises(ValueError, match="'precision' parameter"):
        FineTuneClassifier(precision="int8").fit(np.zeros((4, 8, 8)), [0, 1, 0, 1])
    if not torch.cuda.is_available():
        return
    with pytest.raises(ValueError, match="precision='int8' runs on the CPU"):
        int8_extractor(device="cuda").fit(np.zeros((4, 8, 8)))


def test_weights_have_7_bits_and_the_first_layer_stays_float(calibration):
    """No uint8 x int8 pair can saturate int16 on CPUs without VNNI (2 * 255 * 64 < 2**15)."""
    train, _ = calibration
    model = int8_extractor().fit(train).model_
    quantized = [m for m in model.modules() if ".quantized." in type(m).__module__]
    weights = [m.weight().int_repr() for m in quantized if hasattr(m, "weight")]
    assert len(weights) == 19  # resnet18 has 20 convolutions; the head does not run
    assert max(int(w.abs().max()) for w in weights) == 64  # never more, and all of it used
    first = model.graph.get_submodule("conv1.0")  # conv1, folded and fused with its ReLU
    assert type(first) is torch.nn.Conv2d and first.weight.dtype == torch.float32


def test_the_first_layer_stays_float_inside_blocks_traced_whole(calibration):
    """The first conv inside a block traced whole (Conv2dNormActivation) stays float."""
    train, _ = calibration
    model = int8_extractor(backbone="mobilenet_v2").fit(train).model_
    first = model.graph.get_submodule("features.0.0")
    assert type(first) is torch.nn.Conv2d and first.weight.dtype == torch.float32
    second = model.graph.get_submodule("features.1.conv.0.0")  # the next convolution
    assert ".quantized." in type(second).__module__


def test_activation_histograms_sample_large_batches_but_keep_their_range(monkeypatch):
    """At most HISTOGRAM_SAMPLE values (+ the two extremes) go into each histogram."""
    monkeypatch.setattr(_quantize, "HISTOGRAM_SAMPLE", 1000)
    observer = _quantize._sampled_histogram_observer()(reduce_range=False)
    values = torch.rand(8, 4, 32, 32)
    values[3, 2, 5, 7], values[5, 1, 9, 2] = -3.0, 7.0  # extremes off the sampling stride
    assert observer(values) is values  # the network's activations pass through unchanged
    assert observer.histogram.sum() <= 1000 + 2
    assert (observer.min_val, observer.max_val) == (-3.0, 7.0)
    small = _quantize._sampled_histogram_observer()(reduce_range=False)
    small(values[0, 0, :10])  # 320 values: all of them
    assert small.histogram.sum() == 320


def test_bias_correction_removes_the_mean_error_of_rounded_weights(calibration, monkeypatch):
    """Held-out images: the mean int8 - float32 difference shrinks with the correction."""
    train, test = calibration
    layers = ["layer3"]
    exact = int8_extractor(layers=layers, precision="float32").fit().transform(test)
    corrected = int8_extractor(layers=layers).fit(train).transform(test)
    monkeypatch.setattr(
        _quantize._WeightRoundingError, "mean", lambda self: torch.zeros_like(self.total).float()
    )
    uncorrected = int8_extractor(layers=layers).fit(train).transform(test)
    mean_error = lambda features: np.abs((features - exact).mean(0)).mean()  # noqa: E731
    assert mean_error(corrected) < 0.7 * mean_error(uncorrected)


@needs_offline_weights
@needs_foolbox
def test_int8_imagenet_features_meet_the_quality_targets():
    """Real MobileNet-V2 weights, calibrated on 10 photos, compared on 10 others.

    Targets of the int8 issue: mean cosine to float32 >= 0.97, worst >= 0.93, and at
    least 17 of the 20 photos classified right (float32: 19/20).
    """
    from PIL import Image

    from skdeep.datasets import load_sample_photos

    paths, labels = load_sample_photos("imagenet")
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    int8 = FeatureExtractor(device="cpu", precision="int8").fit(photos[:10]).transform(photos[10:])
    float32 = FeatureExtractor(device="cpu", precision="float32").fit().transform(photos[10:])
    similarity = cosine(int8, float32)
    assert similarity.mean() >= 0.97 and similarity.min() >= 0.93
    logits = FeatureExtractor(device="cpu", precision="int8", layers="classifier.1", pooling=None)
    predicted = logits.fit(photos[:10]).transform(photos).argmax(1)
    assert (predicted == labels).sum() >= 17


class _DataDependent(torch.nn.Module):
    """A network whose forward branches on its data, which torch.fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        x = self.conv(x)
        if x.mean() > 0:
            x = -x
        return self.fc(x.mean((2, 3)))


def test_untraceable_networks_are_refused_clearly(calibration):
    """int8 needs a traced graph: a network torch.fx cannot follow is a clear error."""
    train, _ = calibration
    with pytest.raises(ValueError, match=r"needs a network that torch\.fx can trace"):
        FeatureExtractor(_DataDependent(), precision="int8", image_size=32, device="cpu").fit(train)
