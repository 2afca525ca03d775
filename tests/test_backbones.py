"""Tests of skdeep.backbones: model names, weights names, module backbones."""

import warnings

import pytest
import torch

from skdeep.backbones import classification_models, load_backbone

from .conftest import TinyNet


def test_unknown_backbone_lists_close_matches():
    """Unknown backbone lists close matches."""
    assert "resnet18" in classification_models()
    with pytest.raises(ValueError, match=r"did you mean 'resnet18'"):
        load_backbone("resnet81", weights=None)
    with pytest.raises(TypeError, match=r"model name or an nn\.Module; got int"):
        load_backbone(18, weights=None)


def test_unknown_weights_name_lists_the_valid_ones():
    """Unknown weights name lists the valid ones."""
    with pytest.raises(ValueError, match=r"IMAGENET1K_V9.*'IMAGENET1K_V1'"):
        load_backbone("resnet18", weights="IMAGENET1K_V9")


def test_random_initialisation_builds_without_warnings():
    # googlenet and inception_v3 warn when not told to initialise at random.
    """Random initialisation builds without warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backbone = load_backbone("googlenet", weights=None)
    assert backbone.module.aux_logits and backbone.source == "random initialisation"


def test_module_backbones_are_copied_not_changed(tiny_net, tmp_path):
    """Module backbones are copied not changed."""
    backbone = load_backbone(tiny_net, weights="IMAGENET1K_V1")
    assert backbone.module is not tiny_net
    assert backbone.source == "the module's own parameters"
    with torch.no_grad():
        backbone.module.fc.weight.zero_()
    assert tiny_net.fc.weight.abs().sum() > 0
    other = TinyNet()
    torch.save(other.state_dict(), tmp_path / "tiny.pth")
    loaded = load_backbone(tiny_net, weights=str(tmp_path / "tiny.pth")).module
    torch.testing.assert_close(loaded.state_dict(), other.state_dict())


class WithToken(TinyNet):
    """TinyNet with a bare parameter that no reset_parameters draws."""

    def __init__(self):
        super().__init__()
        self.token = torch.nn.Parameter(torch.zeros(3))


def test_weights_none_draws_a_modules_parameters_again_seeded_by_random_state():
    """A module backbone with weights=None gets random weights, seeded, the module untouched."""
    import pickle

    import numpy as np

    from skdeep import FeatureExtractor, FineTuneClassifier

    from .conftest import separable_images

    torch.manual_seed(0)
    net = TinyNet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)

    def features(**params):
        return FeatureExtractor(net, image_size=16, precision="float32", **params).fit()

    own = features().transform(images)
    first, again, other = (features(weights=None, random_state=s) for s in (0, 0, 1))
    np.testing.assert_array_equal(first.transform(images), again.transform(images))
    assert not np.allclose(first.transform(images), other.transform(images))
    assert not np.allclose(first.transform(images), own)
    for name, value in net.state_dict().items():  # the caller's module is never changed
        torch.testing.assert_close(value, before[name])
    restored = pickle.loads(pickle.dumps(features(weights=None, random_state=None)))
    assert restored.transform(images).shape == own.shape
    X, y = separable_images(n_per_class=4, size=16)
    clfs = [
        FineTuneClassifier(net, weights=None, image_size=16, max_epochs=1, random_state=s).fit(X, y)
        for s in (0, 0, 1)
    ]
    proba = [clf.predict_proba(X) for clf in clfs]
    np.testing.assert_array_equal(proba[0], proba[1])
    assert not np.allclose(proba[0], proba[2])


def test_weights_none_refuses_parameters_it_cannot_draw():
    """A bare nn.Parameter would keep its values: refused, named."""
    with pytest.raises(ValueError, match=r"weights=None .* parameters 'token' of this WithToken"):
        load_backbone(WithToken(), weights=None)
    assert load_backbone(WithToken(), weights="DEFAULT").source == "the module's own parameters"
