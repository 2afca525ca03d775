"""Tests of layer taps, pooled features and pooling."""

import pytest
import torch
import torchvision
from torch import nn

from skdeep._layouts import CHANNELS_FIRST, CHANNELS_LAST, ROWS, TOKENS, Layout, pool, pooled_names
from skdeep._taps import LayerFeatures, LayerTaps, probe_layers


@pytest.fixture
def resnet():
    """Return a seeded ResNet-18 in eval mode."""
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


def test_taps_stop_after_the_deepest_layer(resnet):
    """Taps stop after the deepest layer."""
    later = []
    resnet.layer3.register_forward_hook(lambda *args: later.append("layer3"))
    with torch.no_grad(), LayerTaps(resnet, ["layer2", "layer1"], stop_after="layer2") as taps:
        outputs = taps.run(torch.zeros(1, 3, 64, 64))
    assert set(outputs) == {"layer1", "layer2"}
    assert later == []


def test_hooks_are_removed_afterwards(resnet):
    """Hooks are removed afterwards."""
    with LayerTaps(resnet, ["layer1", "penultimate"]) as taps:
        taps.run(torch.zeros(1, 3, 32, 32))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in resnet.modules())


def test_hooks_are_removed_when_the_forward_pass_fails(resnet):
    """Hooks are removed when the forward pass fails."""
    with pytest.raises(RuntimeError), LayerTaps(resnet, ["layer1"]) as taps:
        taps.run(torch.zeros(1, 5, 32, 32))
    assert not resnet.layer1._forward_hooks


def test_penultimate_is_the_input_of_the_head(resnet):
    """Penultimate is the input of the head; the probe also runs images twice as wide."""
    probe = probe_layers(resnet, ["penultimate", "layer4"], 64)
    x = probe.inputs
    assert x.shape == (2, 3, 64, 64) and x.std() > 0.5  # random, not blank, images
    with torch.no_grad():
        expected = resnet.avgpool(
            resnet.layer4(
                resnet.layer3(
                    resnet.layer2(
                        resnet.layer1(resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x)))))
                    )
                )
            )
        ).flatten(1)
    torch.testing.assert_close(probe.outputs["penultimate"], expected)
    assert probe.deepest == "penultimate"
    assert probe.outputs["layer4"].shape == (2, 512, 2, 2)
    assert probe.wide_outputs["layer4"].shape == (2, 512, 2, 4)


def test_networks_built_for_one_size_refuse_the_wide_probe():
    """A ViT takes only its own input size: the probe records that it could not widen."""
    vit = torchvision.models.vit_b_16(image_size=32).eval()
    probe = probe_layers(vit, ["encoder.layers.encoder_layer_0"], 32)
    assert probe.wide_outputs is None
    assert probe.outputs["encoder.layers.encoder_layer_0"].shape == (2, 5, 768)


def test_reused_modules_are_refused(resnet):
    """Reused modules are refused."""
    with pytest.raises(ValueError, match="run several times"):
        probe_layers(resnet, ["layer1.0.relu"], 32)


def test_layers_that_never_run_are_refused():
    """Layers that never run are refused."""

    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(ValueError, match=r"\['unused'\] never ran"):
        probe_layers(Skips(), ["unused"], 4)


def test_layer_features_need_the_layout_of_every_map(resnet):
    """Rows pool as they are; a map without a worked-out layout is never pooled by guess."""
    with LayerFeatures(resnet, ["penultimate"]) as features:
        assert features(torch.zeros(2, 3, 32, 32)).shape == (2, 512)
    with pytest.raises(RuntimeError, match=r"layout of 'layer2' .* was not worked out"):
        with LayerFeatures(resnet, ["layer2"]) as features:
            features(torch.zeros(2, 3, 32, 32))
    with LayerFeatures(resnet, ["layer2"], "max", layouts={"layer2": "channels_first"}) as f:
        assert f(torch.zeros(2, 3, 32, 32)).shape == (2, 128)


def test_pooling_by_layout():
    """Each layout pools over its own axes; tokens leave their prefix out of means."""
    maps = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    first, last = Layout(CHANNELS_FIRST), Layout(CHANNELS_LAST)
    torch.testing.assert_close(pool(maps, first, "avg"), maps.mean((2, 3)))
    torch.testing.assert_close(pool(maps, first, "max"), maps.amax((2, 3)))
    torch.testing.assert_close(
        pool(maps, first, "avgmax"), torch.cat([maps.mean((2, 3)), maps.amax((2, 3))], 1)
    )
    torch.testing.assert_close(pool(maps, last, "avg"), maps.mean((1, 2)))
    assert pool(maps, first, None).shape == (2, 48)
    tokens = torch.randn(2, 5, 7)
    with_cls = Layout(TOKENS, prefix=2, class_token=True)
    torch.testing.assert_close(pool(tokens, with_cls, "mean"), tokens[:, 2:].mean(1))
    torch.testing.assert_close(pool(tokens, with_cls, "cls"), tokens[:, 0])
    rows = torch.randn(2, 9)
    assert pool(rows, Layout(ROWS), "max") is rows
    assert pooled_names("layer4", (2, 3, 4, 4), first, "avgmax")[3] == "layer4_max_0"
    assert pooled_names("fc", (2, 9), Layout(ROWS), "avg")[0] == "fc_0"
    assert len(pooled_names("layer4", (2, 3, 4, 4), first, None)) == 48
    assert pooled_names("blocks.1", (2, 5, 7), with_cls, "cls+mean")[7] == "blocks.1_mean_0"


def test_later_in_place_operations_do_not_change_tapped_outputs():
    """A tap reads its module's output, whether or not the pass goes on past it.

    DenseNet's forward applies ReLU in place to the output of ``features``: tapping
    ``logits`` too (the whole pass) must not turn the ``features`` rows into ReLU's.
    """

    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            out = nn.functional.relu(self.conv(x), inplace=True)
            return self.fc(out.mean((2, 3)))

    net = InPlace().eval()
    x = torch.randn(2, 3, 8, 8)
    layouts = {"conv": "channels_first"}
    with torch.no_grad():
        expected = net.conv(x).mean((2, 3))
        for layers in (["conv"], ["conv", "logits"]):
            with LayerFeatures(net, layers, "avg", layouts=layouts) as features:
                torch.testing.assert_close(features.pooled(x)["conv"], expected)
            with LayerTaps(net, layers) as taps:
                assert (taps.run(x)["conv"] < 0).any()  # before the ReLU
