"""Tests of skdeep._network: heads, stages, layer names and input sizes."""

import pytest
import torch
import torchvision

from skdeep._network import (
    backbone_stages,
    check_input_size,
    check_layer_names,
    find_head,
    replace_head,
    resolve_layer_names,
)

from .conftest import TinyNet


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


def test_stages_leave_out_the_head():
    """The stages freeze=N counts: the parameterised children, never the head."""
    assert backbone_stages(TinyNet()) == [f"features.{i}" for i in (0, 1, 3, 4)]


def test_layer_names_are_checked_with_suggestions():
    """Layer names are checked with suggestions."""
    model = torchvision.models.resnet18()
    check_layer_names(model, ["layer4", "penultimate", "layer1.0.conv1"])
    with pytest.raises(ValueError, match=r"'layer5' .* did you mean 'layer4'"):
        check_layer_names(model, ["layer5"])
    with pytest.raises(ValueError, match=r"name one module twice"):
        resolve_layer_names(model, ["layer4", "layer4"])


def test_too_small_inputs_name_the_smallest_size_that_works():
    """A network with too many poolings for the input names image_size and a size."""
    model = torchvision.models.alexnet()
    check_input_size(model, 64, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"image_size: .*32x32 .* smallest size that works is 63"):
        check_input_size(model, 32, torch.device("cpu"))
