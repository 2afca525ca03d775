"""Tests of device and precision resolution and seeded random generators."""

import pytest
import torch

from skdeep import _device
from skdeep._device import fork_rng, resolve_device, resolve_precision


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


def test_auto_precision_trains_small_images_in_float32_on_the_cpu(monkeypatch):
    """Auto precision trains small images in float32 on the CPU."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(_device, "cpu_has_native_bfloat16", lambda: True)
    assert resolve_precision("auto", cpu, training_size=64) == torch.float32
    assert resolve_precision("auto", cpu, training_size=224) == torch.bfloat16
    assert resolve_precision("bfloat16", cpu, training_size=64) == torch.bfloat16


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
