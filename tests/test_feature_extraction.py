"""Tests of FeatureExtractor: features, layers, pooling, caching, pickling."""

import io
import warnings

import joblib
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from torch import nn

from skdeep import FeatureExtractor
from skdeep._device import cpu_has_native_bfloat16
from skdeep._weights import weights_file_candidates

from .conftest import TinyNet, needs_foolbox, needs_offline_weights, separable_images
from .estimator_checks import check_image_estimator, run_sklearn_checks


def small_extractor(**params):
    """Return a FeatureExtractor on a random ResNet-18 at 32 px, in float32."""
    defaults = dict(
        backbone="resnet18", weights=None, image_size=32, random_state=0, precision="float32"
    )
    return FeatureExtractor(**{**defaults, **params})


def test_sklearn_common_checks():
    """Scikit-learn common checks."""
    run_sklearn_checks(FeatureExtractor())


def test_image_estimator_checks(images):
    """Image estimator checks."""
    check_image_estimator(small_extractor(layers=["layer2", "penultimate"]), images)


def test_default_features_are_the_penultimate_layer(images):
    """Default features are the penultimate layer."""
    extractor = small_extractor().fit(images)
    features = extractor.transform(images)
    assert features.shape == (12, 512) and features.dtype == np.float32
    assert extractor.get_feature_names_out()[0] == "penultimate_0"


def _unfolded_state(extractor):
    """Rebuild the random weights the extractor started from (before folding)."""
    torch.manual_seed(extractor._torch_seed())
    return torchvision.models.resnet18().state_dict()


def test_features_match_a_hand_written_forward_pass(images):
    """Features match a hand written forward pass."""
    extractor = small_extractor().fit(images)
    model = torchvision.models.resnet18()
    model.load_state_dict(_unfolded_state(extractor))
    model.fc = nn.Identity()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model.eval()((x - mean) / std).numpy()
    np.testing.assert_allclose(extractor.transform(images), expected, rtol=1e-4, atol=1e-4)


def test_several_layers_are_pooled_and_concatenated_in_order(images):
    """Several layers are pooled and concatenated in order."""
    both = small_extractor(layers=["layer4", "layer2"]).fit_transform(images)
    layer4 = small_extractor(layers="layer4").fit_transform(images)
    layer2 = small_extractor(layers="layer2").fit_transform(images)
    np.testing.assert_allclose(both, np.hstack([layer4, layer2]), rtol=1e-5, atol=1e-6)
    names = small_extractor(layers=["layer4", "layer2"]).fit(images).get_feature_names_out()
    assert names[0] == "layer4_avg_0" and names[512] == "layer2_avg_0" and len(names) == 640


@pytest.mark.parametrize(
    "pooling, width", [("avg", 128), ("max", 128), ("avgmax", 256), (None, 128 * 4 * 4)]
)
def test_pooling_options(images, pooling, width):
    """Pooling options."""
    extractor = small_extractor(layers="layer2", pooling=pooling).fit(images)
    features = extractor.transform(images)
    assert features.shape == (12, width) == (12, extractor.n_features_out_)
    if pooling == "avgmax":
        avg = small_extractor(layers="layer2", pooling="avg").fit_transform(images)
        np.testing.assert_allclose(features[:, :128], avg, rtol=1e-5, atol=1e-6)


def test_only_layers_up_to_the_deepest_are_computed(images):
    """Only layers up to the deepest are computed."""
    extractor = small_extractor(layers="layer1").fit(images)
    calls = []
    extractor.model_.layer2.register_forward_hook(lambda *args: calls.append(1))
    extractor.transform(images)
    assert calls == []


def test_equivalent_input_forms_give_equal_features(images, image_files):
    """Equivalent input forms give equal features."""
    extractor = small_extractor().fit(images)
    expected = extractor.transform(images)
    np.testing.assert_allclose(extractor.transform(images / 255.0), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(extractor.transform(image_files), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(extractor.transform(list(images)), expected, rtol=1e-4, atol=1e-5)
    gray = images[..., 0]
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    np.testing.assert_allclose(
        extractor.transform(gray), extractor.transform(rgb), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(extractor.transform(gray[..., None]), extractor.transform(gray))


def test_the_same_pixels_give_the_same_features_in_every_container(tmp_path):
    """Arrays, lists, ragged lists, PIL images and PNG files give equal rows; so does the cache.

    48 px images at image_size=32 (a resize): arrays were resized in uint8 and list
    items in float, 0.01 apart, and the cache gave whichever came first to both.
    """
    images = np.random.default_rng(5).integers(0, 256, (4, 48, 48, 3), dtype=np.uint8)
    files = []
    for index, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{index}.png")
        files.append(str(tmp_path / f"{index}.png"))
    extractor = small_extractor().fit()
    expected = extractor.transform(images)
    other_size = np.zeros((30, 50, 3), np.uint8)
    forms = {
        "list": list(images),
        "ragged list": [*images, other_size],
        "PIL images": [Image.fromarray(image) for image in images],
        "PNG files": files,
    }
    for name, X in forms.items():
        np.testing.assert_array_equal(extractor.transform(X)[:4], expected, err_msg=name)
    cached = small_extractor(memory=str(tmp_path / "cache")).fit()
    cached.transform(list(images))  # the list fills the cache first
    np.testing.assert_array_equal(cached.transform(images), expected)


def test_flat_digit_rows():
    """Flat digit rows."""
    from sklearn.datasets import load_digits

    X = load_digits().data[:20]
    extractor = small_extractor(image_shape=(8, 8), value_range=(0, 16), image_size=16)
    features = extractor.fit_transform(X)
    assert features.shape == (20, 512) and np.isfinite(features).all()
    with pytest.raises(ValueError, match="image_shape"):
        small_extractor().fit_transform(X)


def test_ragged_inputs_of_any_size():
    """Ragged inputs of any size."""
    rng = np.random.default_rng(0)
    items = [
        rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(20, 40), (64, 32), (33, 33)]
    ]
    features = small_extractor().fit_transform(items)
    assert features.shape == (3, 512)


def test_frozen_means_frozen(tiny_net, images):
    """Frozen means frozen."""
    before = {k: v.clone() for k, v in tiny_net.state_dict().items()}
    was_training = tiny_net.training
    extractor = FeatureExtractor(tiny_net, image_size=32, precision="float32").fit(images)
    features = extractor.transform(images)
    assert tiny_net.training == was_training
    for key, value in tiny_net.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in tiny_net.modules())
    assert all(not m._forward_hooks for m in extractor.model_.modules())
    assert not extractor.model_.training
    assert not any(p.requires_grad for p in extractor.model_.parameters())
    assert features.shape == (12, 16)


def test_memory_runs_the_backbone_once_per_image_in_a_grid_search(tmp_path, tiny_net):
    """Memory runs the backbone once per image in a grid search."""
    X, y = separable_images(n_per_class=15, size=16)
    search_params = dict(param_grid={"logisticregression__C": [0.1, 1.0, 10.0]}, cv=3)

    def images_through_backbone(memory):
        extractor = FeatureExtractor(tiny_net, image_size=16, precision="float32", memory=memory)
        TinyNet.images_seen = 0
        extractor.fit()
        probe = TinyNet.images_seen  # the forward pass fit uses to learn the layout
        TinyNet.images_seen = 0
        search = GridSearchCV(make_pipeline(extractor, LogisticRegression()), **search_params)
        search.fit(X, y)
        fits = 3 * 3 + 1  # folds x candidates, plus the refit
        return TinyNet.images_seen - fits * probe, search

    without, plain_search = images_through_backbone(None)
    with_memory, cached_search = images_through_backbone(str(tmp_path / "cache"))
    assert without == 3 * 3 * len(X) + len(X)
    assert with_memory == len(X)
    assert cached_search.best_score_ == plain_search.best_score_
    # A new setting of the extractor computes its own features.
    extractor = FeatureExtractor(
        tiny_net,
        image_size=24,
        precision="float32",
        memory=joblib.Memory(tmp_path / "cache", verbose=0),
    )
    extractor.fit()
    TinyNet.images_seen = 0
    extractor.transform(X[:5])
    assert TinyNet.images_seen == 5


def test_memory_returns_the_same_features(tmp_path, images):
    """Memory returns the same features."""
    extractor = small_extractor(memory=str(tmp_path)).fit(images)
    first = extractor.transform(images)
    np.testing.assert_array_equal(extractor.transform(images[::-1]), first[::-1])
    np.testing.assert_array_equal(first, small_extractor().fit(images).transform(images))


@pytest.mark.parametrize("memory", [False, True])
@pytest.mark.parametrize("change", [{"pooling": "max"}, {"layers": "layer3"}, {"image_size": 24}])
def test_parameters_set_after_fit_ask_for_fit(tmp_path, images, memory, change):
    """A parameter fit builds from, set after fit: a clear error, never stale rows.

    With a cache, pooling="max" returned the average-pooled rows it had cached.
    """
    location = str(tmp_path) if memory else None
    extractor = small_extractor(memory=location).fit()
    extractor.transform(images)
    extractor.set_params(**change)
    (name,) = change
    with pytest.raises(NotFittedError, match=rf"{name}=.* was set after fit.* call fit"):
        extractor.transform(images)
    with pytest.raises(NotFittedError, match=rf"{name}=.* was set after fit"):
        extractor.get_feature_names_out()
    refitted = extractor.fit().transform(images)
    np.testing.assert_array_equal(refitted, small_extractor(**change).fit().transform(images))


def test_settings_transform_reads_when_it_runs_key_the_cache(tmp_path, images):
    """value_range and batch_size set after fit give the rows they give without a cache."""
    extractor = small_extractor(memory=str(tmp_path)).fit()
    extractor.transform(images)
    applied = {}
    for change in ({"value_range": (0, 510)}, {"batch_size": 5}):
        applied.update(change)
        extractor.set_params(**change)
        expected = small_extractor(**applied).fit().transform(images)
        np.testing.assert_array_equal(extractor.transform(images), expected)


def test_pipeline_grid_search_over_layers_pooling_and_c():
    """Pipeline grid search over layers pooling and c."""
    X, y = separable_images(n_per_class=12, size=16)
    pipeline = make_pipeline(small_extractor(image_size=16), LogisticRegression(max_iter=500))
    grid = {
        "featureextractor__layers": ["layer1", ["layer2", "layer3"]],
        "featureextractor__pooling": ["avg", "avgmax"],
        "logisticregression__C": [0.1, 10.0],
    }
    search = GridSearchCV(pipeline, grid, cv=2).fit(X, y)
    assert len(search.cv_results_["params"]) == 8
    assert search.score(X, y) > 0.9


def test_set_output_pandas(images):
    """Set output pandas."""
    pytest.importorskip("pandas")
    extractor = small_extractor(layers="layer1").set_output(transform="pandas")
    frame = extractor.fit_transform(images)
    assert list(frame.columns) == list(extractor.get_feature_names_out())
    assert frame.shape == (12, 64)


def test_joblib_dump_is_small_and_features_survive(tmp_path, images):
    """Joblib dump is small and features survive."""
    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    extractor = FeatureExtractor("resnet18", weights=str(weights), image_size=32).fit()
    expected = extractor.transform(images)
    buffer = io.BytesIO()
    joblib.dump(extractor, buffer)
    assert buffer.tell() < 50_000  # the weights (45 MB) are reloaded, not stored
    buffer.seek(0)
    restored = joblib.load(buffer)
    np.testing.assert_array_equal(restored.transform(images), expected)


def test_random_weights_are_stored_in_the_dump(images):
    """Random weights are stored in the dump."""
    extractor = small_extractor(random_state=None).fit()
    expected = extractor.transform(images)
    buffer = io.BytesIO()
    joblib.dump(extractor, buffer)
    assert buffer.tell() > 40_000_000
    buffer.seek(0)
    np.testing.assert_array_equal(joblib.load(buffer).transform(images), expected)


def test_random_state_makes_random_weights_reproducible(images):
    """Random state makes random weights reproducible."""
    a = small_extractor(random_state=3).fit_transform(images)
    b = small_extractor(random_state=3).fit_transform(images)
    c = small_extractor(random_state=4).fit_transform(images)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_clone_and_set_params(images):
    """Clone and set params."""
    extractor = small_extractor().fit(images)
    other = clone(extractor).set_params(layers="layer3", pooling="max")
    assert other.fit_transform(images).shape == (12, 256)
    assert extractor.transform(images).shape == (12, 512)


@pytest.mark.skipif(not cpu_has_native_bfloat16(), reason="CPU without native bfloat16")
def test_auto_precision_uses_native_bfloat16_with_close_features(images):
    """Auto precision uses native bfloat16 with close features."""
    extractor = small_extractor(precision="auto", device="cpu").fit(images)
    assert extractor.precision_ == torch.bfloat16
    reduced = extractor.transform(images)
    full = small_extractor(device="cpu").fit_transform(images)
    cosine = (
        (reduced * full).sum(1) / np.linalg.norm(reduced, axis=1) / np.linalg.norm(full, axis=1)
    )
    assert cosine.min() > 0.99


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_features_are_the_cpu_features(images):
    """float32 on the GPU gives the CPU's features; "auto" (float16) stays close to them."""
    on_cpu = small_extractor(device="cpu").fit_transform(images)
    extractor = small_extractor(device="cuda").fit(images)
    assert extractor.device_.type == "cuda"
    np.testing.assert_allclose(extractor.transform(images), on_cpu, rtol=1e-4, atol=1e-4)
    half = small_extractor(device="cuda", precision="auto").fit(images)
    assert half.precision_ == torch.float16
    reduced = half.transform(images)
    assert reduced.dtype == np.float32 and np.isfinite(reduced).all()
    norms = np.linalg.norm(reduced, axis=1) * np.linalg.norm(on_cpu, axis=1)
    assert ((reduced * on_cpu).sum(1) / norms).min() > 0.99  # cosine of each row


def test_non_finite_features_are_an_error(images):
    """Non finite features are an error."""

    class Exploding(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x.mean((2, 3)) * float("inf"))

    extractor = FeatureExtractor(Exploding(), image_size=16, precision="float32").fit()
    with pytest.raises(FloatingPointError, match="NaN or infinite values"):
        extractor.transform(images)


@pytest.mark.parametrize(
    "params, error, message",
    [
        (dict(backbone="resnet81"), ValueError, "did you mean 'resnet18'"),
        (dict(layers="layer9"), ValueError, r"'layer9' is not a module .* did you mean 'layer4'"),
        (dict(layers=["layer1", "layer1"]), ValueError, "must not repeat"),
        (dict(layers=[]), ValueError, "non-empty list"),
        (dict(pooling="median"), ValueError, r"'pooling' parameter .* Got 'median'"),
        (dict(batch_size=0), ValueError, r"'batch_size' parameter .* range \[1, inf\)"),
        (dict(precision="half"), ValueError, "'precision' parameter"),
        (dict(device="gpu"), ValueError, r"device must be 'auto', 'cpu'.*got 'gpu'"),
        (dict(value_range=(1, 0)), ValueError, "low < high"),
        (dict(weights="IMAGENET1K_V7"), ValueError, "not a weights name of resnet18"),
    ],
)
def test_bad_parameters_are_named(images, params, error, message):
    """Bad parameters are named."""
    with pytest.raises(error, match=message):
        small_extractor(**params).fit(images)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a CPU-only machine")
def test_cuda_on_a_cpu_machine_is_a_clear_error():
    """CUDA on a CPU machine is a clear error."""
    with pytest.raises(ValueError, match="CUDA is not available"):
        small_extractor(device="cuda").fit()


def test_unfitted_feature_names_raise():
    """Unfitted feature names raise."""
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        FeatureExtractor().get_feature_names_out()


def test_verbose_draws_a_progress_bar(images, capsys):
    """Verbose draws a progress bar."""
    small_extractor(verbose=True).fit_transform(images)
    err = capsys.readouterr().err
    assert "FeatureExtractor: 100%" in err and "12/12" in err and "img/s" in err
    small_extractor(verbose=False).fit_transform(images)
    assert capsys.readouterr().err == ""


def test_file_decoding_workers(image_files):
    """File decoding workers give the features of decoding in the main process.

    On the CPU, where other batch sizes give bit-identical features (cuDNN picks its
    algorithm per batch shape).
    """
    serial = small_extractor(device="cpu").fit_transform(image_files)
    parallel = small_extractor(device="cpu", num_workers=2, batch_size=4)
    parallel = parallel.fit_transform(image_files)
    np.testing.assert_array_equal(parallel, serial)


@needs_offline_weights
def test_default_extractor_has_real_imagenet_weights_offline(images):
    """Default extractor has real ImageNet weights offline.

    On the CPU, which resizes uint8 images in uint8 as PIL does (a GPU resizes in float).
    """
    extractor = FeatureExtractor(precision="float32", device="cpu").fit()
    assert extractor.n_features_out_ == 1280
    assert extractor.preprocessing_.crop_size == 224
    # The same features as torchvision's network holding the checkpoint file itself.
    enum = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
    checkpoint = next(path for path in weights_file_candidates(enum.url) if path.is_file())
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(torch.load(checkpoint, weights_only=True))
    reference.classifier = nn.Identity()
    batch = torch.stack([enum.transforms()(Image.fromarray(image)) for image in images[:4]])
    with torch.inference_mode():
        expected = reference.eval()(batch).numpy()
    np.testing.assert_allclose(extractor.transform(images[:4]), expected, rtol=1e-3, atol=1e-3)


@needs_offline_weights
@needs_foolbox
@pytest.mark.parametrize("form", ["paths", "arrays"])
def test_imagenet_photos_are_classified_correctly(form):
    """ImageNet photos are classified correctly."""
    from PIL import Image

    from skdeep.datasets import load_sample_photos

    paths, labels = load_sample_photos("imagenet")
    X = paths if form == "paths" else [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logits = FeatureExtractor(layers="classifier.1").fit_transform(X)
    top1 = int((logits.argmax(1) == labels).sum())
    assert top1 >= 17, f"top-1 {top1}/20"
