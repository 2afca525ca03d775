"""Tests of the inference rewrites: batch-norm folding and fused convolutions."""

import pytest
import torch
import torchvision
from torch import nn

from skdeep._inference import FusedConv2d, fused_convolution_available, optimize_for_inference

from .conftest import TinyNet

CPU = torch.device("cpu")
needs_onednn = pytest.mark.skipif(not fused_convolution_available(), reason="no oneDNN")


def trained_looking(name):
    """Build a torchvision network with non-trivial batch-norm statistics, in eval mode."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize(
    "name", ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outputs_and_module_names_are_kept(name, dtype):
    """Outputs and module names are kept."""
    model = trained_looking(name)
    x = torch.randn(2, 3, 64, 64)
    names = {n for n, _ in model.named_modules()}
    with torch.inference_mode(), torch.autocast("cpu", dtype, enabled=dtype != torch.float32):
        expected = model(x).float()
        optimized = optimize_for_inference(model, CPU, dtype)
        actual = optimized(x).float()
    assert {n for n, _ in optimized.named_modules()} == names
    assert not any(isinstance(m, nn.BatchNorm2d) for m in optimized.modules())
    fused = any(isinstance(m, FusedConv2d) for m in optimized.modules())
    assert fused == fused_convolution_available(dtype)
    if dtype != torch.float32:
        assert optimized.get_submodule(first_convolution(optimized)).weight.dtype == dtype
    tolerance = 1e-4 if dtype == torch.float32 else 0.1 * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, atol=tolerance, rtol=0.05)


def first_convolution(model) -> str:
    """Return the name of the first convolution of ``model``."""
    return next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))


@needs_onednn
def test_activations_run_inside_the_convolutions():
    """Activations run inside the convolutions."""
    model = optimize_for_inference(trained_looking("mobilenet_v2"), CPU)
    fused = [m for m in model.modules() if isinstance(m, FusedConv2d)]
    assert len(fused) == 35  # every Conv-BN-ReLU6 of MobileNet-V2
    assert not any(isinstance(m, nn.ReLU6) for m in model.modules())
    assert "features.1.conv.0.0.weight" in model.state_dict()


def tapped_output(model, name, x):
    """Return what the module ``name`` outputs in one forward pass."""
    seen = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.inference_mode():
        model(x)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize(
    "name", ["features.1.conv.0.0", "features.1.conv.0.1", "features.1.conv.0.2", "features.2"]
)
def test_a_tapped_module_sees_the_same_values_when_kept(name):
    """Conv, BatchNorm, ReLU6 and a whole block: what FeatureExtractor taps is kept."""
    model = trained_looking("mobilenet_v2")
    x = torch.randn(2, 3, 64, 64)
    expected = tapped_output(model, name, x)
    optimize_for_inference(model, CPU, keep=frozenset({name}))
    torch.testing.assert_close(tapped_output(model, name, x), expected, atol=1e-4, rtol=1e-4)


def test_kept_modules_keep_their_own_output():
    """Kept modules keep their own output."""
    model = trained_looking("mobilenet_v2")
    optimize_for_inference(model, CPU, keep=frozenset({"features.1.conv.0.1", "features.0.0"}))
    assert isinstance(model.features[0][0], nn.Conv2d) and not isinstance(
        model.features[0][0], FusedConv2d
    )
    assert isinstance(model.features[0][1], nn.BatchNorm2d)
    assert isinstance(model.features[1].conv[0][2], nn.ReLU6)


def test_reused_activations_are_not_fused():
    """Reused activations are not fused."""
    model = optimize_for_inference(trained_looking("resnet18"), CPU)
    assert isinstance(model.layer1[0].relu, nn.ReLU)  # called twice per block
    assert isinstance(model.layer1[0].bn1, nn.Identity)


def test_models_fx_cannot_trace_are_left_unchanged(tiny_net):
    # TinyNet.forward calls len() on its input, which symbolic tracing cannot follow.
    """Models FX cannot trace are left unchanged."""
    optimize_for_inference(tiny_net.eval(), CPU)
    assert isinstance(tiny_net.features[1], nn.BatchNorm2d)
    assert type(tiny_net) is TinyNet
