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
