"""Tests of FineTuneClassifier: training, freezing, labels, predictions, pickling."""

import io
import pickle

import joblib
import numpy as np
import pytest
import torch
from scipy.special import softmax
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from torch import nn

from skdeep import FineTuneClassifier
from skdeep._augment import MAX_ROTATION, augment, parse_augment
from skdeep._images import as_image_source

from .conftest import TinyNet, needs_offline_weights, separable_images, tiny_training
from .estimator_checks import check_image_estimator, run_sklearn_checks


def small_resnet(**params):
    """Return a FineTuneClassifier on a random ResNet-18 at 24 px, batches of 8."""
    defaults = dict(weights=None, image_size=24, batch_size=8, random_state=0)
    return FineTuneClassifier("resnet18", **{**defaults, **params})


def tiny_classifier(net=None, **params):
    """Return a FineTuneClassifier with the fast settings of ``tiny_training``."""
    if net is not None:
        params["backbone"] = net
    return FineTuneClassifier(**tiny_training(**params))


@pytest.fixture
def data():
    """Return two easy classes of 24 images each."""
    return separable_images(n_per_class=24, size=24)


def test_sklearn_common_checks():
    """Scikit-learn common checks."""
    run_sklearn_checks(FineTuneClassifier())


@pytest.mark.parametrize("method", ["predict", "predict_proba", "transform"])
def test_image_estimator_checks(data, method):
    """Image estimator checks."""
    X, y = data
    check_image_estimator(tiny_classifier(max_epochs=1), X, y, method=method)


def test_training_learns_an_easy_task(data):
    """Training learns an easy task."""
    X, y = data
    test_X, test_y = separable_images(n_per_class=20, size=24, seed=1)
    clf = tiny_classifier().fit(X, y)
    assert clf.score(test_X, test_y) >= 0.9
    assert clf.history_[-1]["train_loss"] < clf.history_[0]["train_loss"]
    untrained = tiny_classifier(lr=1e-12, backbone_lr=1e-12).fit(X, y)
    assert untrained.score(test_X, test_y) < clf.score(test_X, test_y)


def test_resnet18_learns_with_augmentation(data):
    """ResNet-18 learns with augmentation."""
    X, y = data
    clf = small_resnet(max_epochs=3, augment="crop").fit(X, y)
    assert clf.score(*separable_images(n_per_class=20, size=24, seed=1)) >= 0.8


def test_freeze_backbone_keeps_every_backbone_tensor_bit_identical(data):
    """Freeze backbone keeps every backbone tensor bit identical."""
    X, y = data
    net = TinyNet()
    reference = {k: v.clone() for k, v in net.state_dict().items()}
    clf = tiny_classifier(net, freeze="backbone").fit(X, y)
    trained = clf.model_.state_dict()
    for name, tensor in reference.items():
        if not name.startswith("fc."):
            assert torch.equal(trained[name].cpu(), tensor), name
    assert clf.frozen_modules_ == ["features.0", "features.1", "features.3", "features.4"]


def test_freeze_first_stages_and_named_modules(data):
    """Freeze first stages and named modules."""
    X, y = data
    net = TinyNet()
    clf = tiny_classifier(net, freeze=2).fit(X, y)
    after = {name: tensor.cpu() for name, tensor in clf.model_.state_dict().items()}
    before = net.state_dict()
    assert torch.equal(after["features.0.weight"], before["features.0.weight"])
    assert torch.equal(after["features.1.running_mean"], before["features.1.running_mean"])
    assert not torch.equal(after["features.3.weight"], before["features.3.weight"])
    clf = tiny_classifier(net, freeze=["features.3"]).fit(X, y)
    after = {name: tensor.cpu() for name, tensor in clf.model_.state_dict().items()}
    assert torch.equal(after["features.3.weight"], before["features.3.weight"])
    assert not torch.equal(after["features.0.weight"], before["features.0.weight"])


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(freeze=["features.9"]), r"freeze: 'features.9' is not a module .* did you mean"),
        (dict(freeze=["fc"]), "holds the new classifier head"),
        (dict(freeze=9), r"freeze=9 but the backbone has 4 stages"),
        (dict(lr=-1.0), r"'lr' parameter .* range \(0.0, inf\)"),
        (dict(validation_fraction=1.5), r"'validation_fraction' parameter .* range \(0.0, 1.0\)"),
        (dict(optimizer="adam"), r"'optimizer' parameter .* Got 'adam'"),
        (dict(augment="crop+spin"), r"augment must be .* joined by '\+'.*got 'crop\+spin'"),
        (dict(augment="crop+crop"), r"augment must be .*got 'crop\+crop'"),
        (
            dict(class_weight={"up": 2.0}),
            r"class_weight names labels that are not classes: \['up'\]",
        ),
        (dict(max_epochs=0), r"'max_epochs' parameter"),
    ],
)
def test_bad_parameters_are_named(data, params, message):
    """Bad parameters are named."""
    X, y = data
    with pytest.raises(ValueError, match=message):
        tiny_classifier(**params).fit(X, y)


def test_a_failed_fit_leaves_the_estimator_unfitted(data):
    """A failed fit leaves the estimator unfitted."""
    X, y = data
    clf = tiny_classifier().fit(X, y)
    with pytest.raises(ValueError, match="freeze"):
        clf.set_params(freeze=["no_such_layer"]).fit(X, y)
    with pytest.raises(NotFittedError):
        clf.predict(X)


def test_bad_labels(data):
    """Bad labels."""
    X, y = data
    with pytest.raises(ValueError, match="y has 47 labels but X has 48 images"):
        tiny_classifier().fit(X, y[:-1])
    with pytest.raises(ValueError, match=r"single class \('a' in every labeled row\)"):
        tiny_classifier().fit(X, np.full(len(X), "a"))
    with pytest.raises(ValueError, match="Unknown label type"):
        tiny_classifier().fit(X, np.linspace(0, 1, len(X)))
    with pytest.raises(ValueError, match="X is empty"):
        tiny_classifier().fit(np.zeros((0, 8, 8)), [])


def test_labels_of_any_kind_come_back(data):
    """Labels of any kind come back."""
    X, y = data
    numeric = np.where(y == "horizontal", 7, 42)
    clf = tiny_classifier().fit(X, numeric)
    assert clf.classes_.tolist() == [7, 42]
    assert set(clf.predict(X)) <= {7, 42}
    assert clf.score(X, numeric) > 0.9
    proba = clf.predict_proba(X)
    np.testing.assert_allclose(proba.sum(1), 1.0)
    assert clf.decision_function(X).shape == (48,)
    np.testing.assert_array_equal(
        clf.classes_[(clf.decision_function(X) > 0).astype(int)], clf.predict(X)
    )


def test_multiclass_scores(data):
    """Multiclass scores."""
    X, _ = data
    y = np.array(["a", "b", "c"] * 16)
    clf = tiny_classifier(max_epochs=1).fit(X, y)
    assert clf.decision_function(X).shape == (48, 3)
    assert clf.predict_proba(X).shape == (48, 3)
    np.testing.assert_array_equal(clf.predict(X), clf.classes_[clf.predict_proba(X).argmax(1)])


def test_same_seed_same_model_and_refit_starts_from_the_pretrained_weights(data):
    """Same seed same model and refit starts from the pretrained weights."""
    X, y = data
    clf = tiny_classifier(augment="crop+flip")
    first = clf.fit(X, y).predict_proba(X)
    np.testing.assert_array_equal(clf.fit(X, y).predict_proba(X), first)
    np.testing.assert_array_equal(clone(clf).fit(X, y).predict_proba(X), first)
    other_seed = tiny_classifier(augment="crop+flip", random_state=1).fit(X, y)
    assert not np.array_equal(other_seed.predict_proba(X), first)


def test_warm_start_continues_training(data):
    """Warm start continues training."""
    X, y = data
    clf = tiny_classifier(warm_start=True, max_epochs=1).fit(X, y)
    weights = clf.model_.fc.weight.detach().clone()
    clf.fit(X, y)
    assert len(clf.history_) == 2
    assert not torch.equal(clf.model_.fc.weight, weights)
    with pytest.raises(ValueError, match="warm_start=True needs the classes"):
        clf.fit(X, np.where(y == "horizontal", "up", "down"))


def test_a_warm_start_refuses_another_network_or_size(data):
    """A warm start keeps the fitted network and its size: changing them is refused.

    Before, a warm start after ``set_params(image_size=...)`` trained at the old size
    (and "auto" picked its precision from it) without a word.
    """
    X, y = data
    net = TinyNet()
    clf = tiny_classifier(net, warm_start=True, max_epochs=1).fit(X, y)
    expected = clf.predict_proba(X)
    with pytest.raises(ValueError, match=r"built with image_size=24; got image_size=16"):
        clf.set_params(image_size=16).fit(X, y)
    with pytest.raises(
        ValueError,
        match=r"built with backbone=<TinyNet module at 0x\w+>; got backbone=<TinyNet module",
    ):
        clf.set_params(image_size=24, backbone=TinyNet()).fit(X, y)
    np.testing.assert_array_equal(clf.predict_proba(X), expected)  # refused: as it was
    clf.set_params(backbone=net).fit(X, y)  # the same module continues
    assert len(clf.history_) == 2 and clf.preprocessing_.crop_size == 24
    clf.set_params(warm_start=False, image_size=16).fit(X, y)  # a new network: its size
    assert clf.preprocessing_.crop_size == 16 and len(clf.history_) == 1


def test_users_module_is_never_changed(data):
    """Users module is never changed."""
    X, y = data
    net = TinyNet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    tiny_classifier(net).fit(X, y)
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key])
    assert net.fc.out_features == 10


def test_early_stopping_keeps_the_best_epoch(data):
    """Early stopping keeps the best epoch."""
    X, y = data
    clf = tiny_classifier(early_stopping=True, max_epochs=8, n_iter_no_change=2).fit(X, y)
    losses = [record["valid_loss"] for record in clf.history_]
    assert all("valid_accuracy" in record for record in clf.history_)
    assert clf.best_epoch_ == int(np.argmin(losses)) + 1
    stalled = tiny_classifier(
        early_stopping=True, max_epochs=20, n_iter_no_change=2, lr=1e-12, freeze="backbone"
    ).fit(X, y)
    assert stalled.n_epochs_ == 3 and stalled.best_epoch_ == 1


def test_class_weights_pull_predictions_towards_the_heavier_class():
    # Noise with random labels: the network can only learn the prior, so the weights
    # decide which class it predicts.
    """Class weights pull predictions towards the heavier class."""
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, (48, 24, 24, 3), dtype=np.uint8)
    y = np.array(["common"] * 36 + ["rare"] * 12)
    rng.shuffle(y)
    test = rng.integers(0, 256, (40, 24, 24, 3), dtype=np.uint8)

    def rare_share(class_weight):
        clf = tiny_classifier(class_weight=class_weight, max_epochs=3).fit(X, y)
        return float(np.mean(clf.predict(test) == "rare"))

    unweighted = rare_share(None)
    assert rare_share("balanced") > unweighted
    assert rare_share({"rare": 10.0}) > rare_share({"common": 10.0})
    assert rare_share({"rare": 10.0}) >= 0.9 and rare_share({"common": 10.0}) <= 0.1


def test_keyboard_interrupt_leaves_a_usable_estimator(data):
    """Keyboard interrupt leaves a usable estimator."""
    X, y = data

    class Interrupting(TinyNet):
        calls = 0

        def forward(self, x):
            if self.training:
                Interrupting.calls += 1
                if Interrupting.calls == 8:  # second epoch, second batch
                    raise KeyboardInterrupt
            return super().forward(x)

    with pytest.warns(RuntimeWarning, match="training interrupted after 1 complete epoch"):
        clf = tiny_classifier(Interrupting(), max_epochs=5).fit(X, y)
    assert clf.n_epochs_ == 1
    assert clf.predict(X).shape == (48,)


def test_transform_gives_fine_tuned_features_for_another_estimator(data):
    """Transform gives fine tuned features for another estimator."""
    X, y = data
    clf = tiny_classifier().fit(X, y)
    features = clf.transform(X)
    assert features.shape == (48, 16) and features.dtype == np.float32
    assert LogisticRegression().fit(features, y).score(features, y) > 0.9


def test_pipeline_cross_validation_and_grid_search(data):
    """Pipeline cross validation and grid search."""
    X, y = data
    scores = cross_val_score(tiny_classifier(max_epochs=2), X, y, cv=2)
    assert scores.shape == (2,) and scores.mean() > 0.7
    search = GridSearchCV(
        make_pipeline(tiny_classifier(max_epochs=1)),
        {"finetuneclassifier__lr": [0.01, 1e-6], "finetuneclassifier__freeze": [None, "backbone"]},
        cv=2,
    ).fit(X, y)
    assert search.best_params_["finetuneclassifier__lr"] == 0.01
    assert search.predict(X).shape == (48,)


def test_dump_made_for_a_missing_gpu_loads_on_the_cpu(data):
    """Dump made for a missing GPU loads on the CPU."""
    X, y = data
    clf = tiny_classifier(max_epochs=1, device="cpu").fit(X, y)
    expected = clf.predict_proba(X)
    state = clf.__getstate__()
    state["device"] = "cuda:7"  # as if fitted on a GPU machine
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has the GPU")
    restored = FineTuneClassifier.__new__(FineTuneClassifier)
    with pytest.warns(RuntimeWarning, match="Loaded on the CPU instead"):
        restored.__setstate__(pickle.loads(pickle.dumps(state)))
    assert restored.device_ == torch.device("cpu")
    np.testing.assert_array_equal(restored.predict_proba(X), expected)


def test_joblib_round_trip(data, tmp_path):
    """Joblib round trip."""
    X, y = data
    clf = tiny_classifier(max_epochs=1).fit(X, y)
    joblib.dump(clf, tmp_path / "clf.joblib")
    restored = joblib.load(tmp_path / "clf.joblib")
    np.testing.assert_array_equal(restored.predict(X), clf.predict(X))
    buffer = io.BytesIO()
    joblib.dump(clf, buffer)
    assert buffer.tell() < 100_000  # TinyNet: the fitted state stays small


def test_verbose_shows_progress_and_history(data, capsys):
    """Verbose shows progress and history."""
    X, y = data
    tiny_classifier(max_epochs=1, verbose=True, early_stopping=True).fit(X, y)
    err = capsys.readouterr().err
    assert "FineTuneClassifier epoch 1/1: 100%" in err and "43/43" in err
    assert "train_loss=" in err and "valid_acc=" in err  # the epoch's numbers, at its end


def test_reduced_precision_trains(data):
    """Reduced precision trains."""
    X, y = data
    clf = tiny_classifier(precision="bfloat16").fit(X, y)
    assert clf.score(X, y) > 0.9


def test_augmentation_is_batched_and_seeded():
    """Augmentation is batched and seeded."""
    images = torch.rand(6, 3, 8, 8)
    flipped = augment(images, ("flip",), torch.Generator().manual_seed(0))
    for original, out in zip(images, flipped, strict=True):
        assert torch.equal(out, original) or torch.equal(out, original.flip(-1))
    cropped = augment(images, ("crop", "flip"), torch.Generator().manual_seed(0))
    again = augment(images, ("crop", "flip"), torch.Generator().manual_seed(0))
    assert cropped.shape == images.shape and torch.equal(cropped, again)
    assert not torch.allclose(cropped, images)
    assert augment(images, (), torch.Generator()) is images


def test_augment_parameter_names_kinds_in_any_order():
    """An augment parameter names its kinds joined by '+', in any order."""
    assert parse_augment(True) == ("crop", "flip")
    assert parse_augment(None) == parse_augment(False) == ()
    assert parse_augment("rotate+crop") == ("crop", "rotate")
    assert parse_augment("flip") == ("flip",)
    with pytest.raises(ValueError, match=r"got 3"):
        parse_augment(3)


def test_rotations_turn_images_by_at_most_the_maximum_angle():
    """Rotations turn each image about its centre, by different angles within the bound."""
    size = 33
    coords = torch.arange(size) - size // 2
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    bar = ((yy.abs() <= 1) & (xx.abs() <= 12)).float()  # a horizontal bar
    images = bar.expand(64, 3, size, size).clone()
    turned = augment(images, ("rotate",), torch.Generator().manual_seed(0))[:, 0]
    # The bar's orientation from its second moments (image y grows downwards).
    mass = turned.sum((1, 2))
    cx, cy = (turned * xx).sum((1, 2)) / mass, (turned * yy).sum((1, 2)) / mass
    assert cx.abs().max() < 0.5 and cy.abs().max() < 0.5  # turned about the centre
    sxx = (turned * (xx - cx[:, None, None]) ** 2).sum((1, 2))
    syy = (turned * (yy - cy[:, None, None]) ** 2).sum((1, 2))
    sxy = (turned * (xx - cx[:, None, None]) * (yy - cy[:, None, None])).sum((1, 2))
    degrees = torch.rad2deg(0.5 * torch.atan2(2 * sxy, sxx - syy)).abs()
    assert degrees.max() <= MAX_ROTATION + 1.0
    assert degrees.max() > MAX_ROTATION / 2 and degrees.std() > 2  # each image its own angle
    disc = (xx**2 + yy**2 <= 64).float().expand(4, 3, size, size)
    spun = augment(disc, ("rotate",), torch.Generator().manual_seed(1))
    assert (spun - disc).abs().mean() < 0.02  # a disc looks the same turned


@needs_offline_weights
def test_pretrained_mobilenet_fine_tunes(data):
    """Pretrained MobileNet fine tunes."""
    X, y = data
    clf = FineTuneClassifier(image_size=32, max_epochs=3, batch_size=16, random_state=0)
    assert clf.fit(X, y).score(*separable_images(n_per_class=20, size=24, seed=1)) >= 0.8


def test_predictions_run_the_rewritten_network_with_the_same_results(data):
    """Predictions run the rewritten network with the same results (in float32)."""
    X, y = data
    clf = small_resnet(max_epochs=1, precision="float32").fit(X, y)
    predictor = clf._predictor()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in predictor.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in clf.model_.modules())  # kept for training
    trained = clf._pooled_features(as_image_source(X), clf.model_, ["logits"], None)
    np.testing.assert_allclose(clf.predict_proba(X), softmax(trained, axis=1), atol=1e-5)


def test_feature_names_name_the_transform_columns(data):
    """Feature names name the transform columns."""
    X, y = data
    clf = tiny_classifier(max_epochs=1).fit(X, y)
    names = clf.get_feature_names_out()
    assert names.tolist() == [f"penultimate_{i}" for i in range(16)]
    assert clf.transform(X[:3]).shape == (3, len(names))
    with pytest.raises(NotFittedError):
        tiny_classifier().get_feature_names_out()


def test_networks_with_auxiliary_classifiers_fine_tune():
    """GoogLeNet (and Inception v3) return their auxiliary outputs while training: removed."""
    import torchvision

    from skdeep._network import drop_auxiliary_heads

    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    y = np.array(["a", "b"] * 3)
    clf = FineTuneClassifier(
        "googlenet", weights=None, image_size=32, max_epochs=1, batch_size=3, random_state=0
    ).fit(X, y)
    assert clf.model_.aux1 is None and clf.predict(X).shape == (6,)
    inception = torchvision.models.inception_v3(weights=None, init_weights=False)
    assert drop_auxiliary_heads(inception) == ["AuxLogits"] and inception.AuxLogits is None
