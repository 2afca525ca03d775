"""Tests of device and precision resolution and seeded random generators."""

import numpy as np
import pytest
import torch

from skdeep import _device
from skdeep._device import autocast, fork_rng, resolve_device, resolve_precision


def test_resolve_device():
    """Resolve device."""
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(ValueError, match="got 'gpu'"):
        resolve_device("gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_cuda_requested_without_cuda():
    """CUDA requested without CUDA."""
    with pytest.raises(ValueError, match="device='cuda:1' was requested but CUDA is not available"):
        resolve_device("cuda:1")


def test_auto_precision_follows_the_hardware(monkeypatch):
    """Auto precision follows the hardware."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(_device, "cpu_has_native_bfloat16", lambda: True)
    assert resolve_precision("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(_device, "cpu_has_native_bfloat16", lambda: False)
    assert resolve_precision("auto", cpu) == torch.float32
    assert resolve_precision("auto", torch.device("cuda")) == torch.float16
    assert resolve_precision("bfloat16", cpu) == torch.bfloat16
    assert resolve_precision("auto", torch.device("cuda"), training_size=32) == torch.float16
    with pytest.raises(ValueError, match="float16' needs a CUDA device"):
        resolve_precision("float16", cpu)
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("half", cpu)


@pytest.mark.parametrize(
    "instructions, float32_below",
    [({"AMX", "AVX512-BF16"}, 128), ({"AVX512-BF16"}, 64), ({"AMX"}, 128), (set(), None)],
)
def test_auto_precision_trains_in_bfloat16_from_the_size_where_this_cpu_gains(
    monkeypatch, instructions, float32_below
):
    """Each kind of CPU trains in bfloat16 from its own crossover size; inference at any size."""
    cpu = torch.device("cpu")
    flags = {
        name: name in instructions for name in ("AVX2", "AVX512", "VNNI", "AVX512-BF16", "AMX")
    }
    monkeypatch.setattr(_device, "cpu_instruction_sets", lambda: flags)
    for size in (32, 63, 64, 127, 128, 224, 512):
        trains_bfloat16 = float32_below is not None and size >= float32_below
        expected = torch.bfloat16 if trains_bfloat16 else torch.float32
        assert resolve_precision("auto", cpu, training_size=size) == expected, size
        assert resolve_precision("bfloat16", cpu, training_size=size) == torch.bfloat16
    inference = torch.bfloat16 if instructions else torch.float32
    assert resolve_precision("auto", cpu) == inference


def test_fork_rng_seeds_without_touching_the_callers_generator():
    """Fork rng seeds without touching the callers generator."""
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    with fork_rng(torch.device("cpu"), 7):
        inside = torch.rand(1)
    with fork_rng(torch.device("cpu"), 7):
        assert torch.equal(torch.rand(1), inside)
    assert torch.equal(torch.rand(1), expected_next)


# ----------------------------------------------------------------------------------------
# On a GPU (benchmarks/gpu_checks.sh runs the suite there; CI has none)
# ----------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_cuda_training_with_float16_and_a_gradient_scaler_learns():
    """Fine-tuning and domain adaptation train on the GPU in float16 (with a gradient scaler)."""
    from skdeep import DomainAdaptedClassifier, FineTuneClassifier

    from .conftest import separable_images, tiny_training

    X, y = separable_images(n_per_class=24, size=24)
    test_X, test_y = separable_images(n_per_class=20, size=24, seed=1)
    params = tiny_training(device="cuda", precision="auto", max_epochs=5)
    clf = FineTuneClassifier(**params).fit(X, y)
    assert clf.device_.type == "cuda" and clf.precision_ == torch.float16
    assert next(clf.model_.parameters()).device.type == "cuda"
    assert clf.score(test_X, test_y) >= 0.9
    adapted = DomainAdaptedClassifier(**tiny_training(device="cuda", precision="auto"))
    adapted.fit(X, y, X_target=test_X)
    assert adapted.predict_proba(test_X).shape == (len(test_X), 2)


def _depthwise_net() -> torch.nn.Sequential:
    """Return a stem, a trainable and a frozen depthwise convolution, and a pointwise one."""
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=8),
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=8),
        torch.nn.Conv2d(8, 4, 1),
    )
    net[2].requires_grad_(False)
    return net


def test_bfloat16_training_runs_trainable_depthwise_convolutions_in_float32():
    """Inside the block a small or strided trainable depthwise conv computes in float32."""
    import pickle

    from skdeep._device import float32_depthwise_convolutions

    net = _depthwise_net()
    seen = {}
    hooks = [
        net[index].register_forward_hook(
            lambda module, args, out, index=index: seen.__setitem__(index, out.dtype)
        )
        for index in range(4)
    ]
    cpu = torch.device("cpu")
    images = torch.rand(2, 3, 8, 8)
    with float32_depthwise_convolutions(net, cpu, torch.bfloat16), autocast(cpu, torch.bfloat16):
        net(images).float().sum().backward()
    assert seen == {0: torch.bfloat16, 1: torch.float32, 2: torch.bfloat16, 3: torch.bfloat16}
    assert net[1].weight.grad is not None and net[2].weight.grad is None
    larger = torch.rand(2, 3, 15, 14)  # 210 pixels: over 14x14, bfloat16 is the faster
    with float32_depthwise_convolutions(net, cpu, torch.bfloat16), autocast(cpu, torch.bfloat16):
        net(larger)
        assert seen[1] == torch.bfloat16
        net[1].stride = (2, 2)  # strided: float32 at any size
        net(larger)
        assert seen[1] == torch.float32
        net[1].stride = (1, 1)
    assert all(type(module) is torch.nn.Conv2d for module in net)
    with autocast(cpu, torch.bfloat16):
        net(images)
    assert seen[1] == torch.bfloat16  # outside the block: autocast as usual
    for hook in hooks:
        hook.remove()
    assert "skdeep" not in str(pickle.dumps(net))  # no class of skdeep's left behind
    with float32_depthwise_convolutions(net, cpu, torch.float32), autocast(cpu, torch.float32):
        assert all(type(module) is torch.nn.Conv2d for module in net)  # only for bfloat16
    with pytest.raises(RuntimeError, match="inside"):
        with float32_depthwise_convolutions(net, cpu, torch.bfloat16):
            raise RuntimeError("inside")
    assert all(type(module) is torch.nn.Conv2d for module in net)


def test_a_bfloat16_fine_tune_leaves_plain_convolutions_in_its_model():
    """A bfloat16 fit of a depthwise network returns a model of plain modules."""
    import pickle

    from skdeep import FineTuneClassifier

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    body = _depthwise_net()
    backbone = torch.nn.Sequential(*body, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                   torch.nn.Linear(4, 3))  # fmt: skip
    clf = FineTuneClassifier(backbone, weights=None, image_size=16, max_epochs=1, batch_size=4,
                             precision="bfloat16", random_state=0, augment=False)  # fmt: skip
    clf.fit(images, np.array([0, 1] * 4))
    assert clf.precision_ == torch.bfloat16
    assert {type(module) for module in clf.model_.modules()} <= {
        torch.nn.Sequential, torch.nn.Conv2d, torch.nn.AdaptiveAvgPool2d, torch.nn.Flatten,
        torch.nn.Linear,
    }  # fmt: skip
    pickle.loads(pickle.dumps(clf)).predict(images)
