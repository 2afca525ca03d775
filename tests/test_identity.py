"""Tests of skdeep._identity: one identity of features for the cache and the store."""

from __future__ import annotations

import os
import pickle
import warnings

import numpy as np
import pytest
import torch
import torchvision

from skdeep import FeatureExtractor
from skdeep._base import _shared_networks
from skdeep._identity import (
    architecture_digest,
    differences,
    feature_identity,
    identity_digest,
    input_identity,
)
from skdeep._weights import WeightsChangedError

from .conftest import TinyNet


def key(extractor: FeatureExtractor) -> str:
    """Return the per-image cache's key of a fitted extractor."""
    return identity_digest(feature_identity(extractor))


def fitted(backbone=None, **params) -> FeatureExtractor:
    """Fit a float32 extractor on a seeded TinyNet (or ``backbone``) at 16 px."""
    torch.manual_seed(0)
    defaults = dict(image_size=16, precision="float32", layers="features.3")
    return FeatureExtractor(backbone or TinyNet(), **{**defaults, **params}).fit()


def test_architecture_counts_not_only_the_state_dict():
    """Equal parameters, another stride, eps or flag: another architecture, another key."""
    torch.manual_seed(0)
    net = TinyNet()
    strided, eps = TinyNet(), TinyNet()
    strided.load_state_dict(net.state_dict())
    eps.load_state_dict(net.state_dict())
    strided.features[0].stride = (2, 2)
    eps.features[1].eps = 1e-3
    digests = {architecture_digest(m) for m in (net, strided, eps)}
    assert len(digests) == 3
    keys = {key(fitted(m)) for m in (net, strided, eps)}
    assert len(keys) == 3


def test_torchvisions_transform_input_flag_counts():
    """GoogLeNet is built with transform_input=True only for named weights."""
    plain = torchvision.models.googlenet(init_weights=False, aux_logits=False)
    flagged = torchvision.models.googlenet(
        init_weights=False, aux_logits=False, transform_input=True
    )
    flagged.load_state_dict(plain.state_dict())
    assert architecture_digest(plain) != architecture_digest(flagged)


@pytest.mark.parametrize(
    "change",
    [
        {"layers": "features.0"},
        {"pooling": "max"},
        {"image_size": 24},
        {"value_range": (0, 128)},
        {"batch_size": 7},
        {"layouts": {"features.3": "channels_first"}},  # the same layout: the same key
    ],
)
def test_every_setting_that_shapes_rows_changes_the_key(change):
    """Layers, pooling, geometry, value range and batch size change the key.

    A restated layout does not: the identity holds what is resolved, not how it was said.
    """
    same = "layouts" in change
    assert (key(fitted(**change)) == key(fitted())) is same


def test_weights_precision_and_preprocessing_change_the_key(images):
    """Other weights, another precision or another normalization: another key."""
    base = fitted()
    torch.manual_seed(1)
    assert key(fitted(TinyNet())) != key(base)
    assert key(fitted(precision="bfloat16")) != key(base)
    other = fitted()
    other.preprocessing_ = type(other.preprocessing_)(mean=(0.5, 0.5, 0.5))
    assert key(other) != key(base)
    assert differences(feature_identity(base), feature_identity(other))[0].startswith(
        "preprocessing="
    )


def test_input_identity_sees_file_changes_and_labels(tmp_path):
    """A file rewritten in place, another .npy file, other labels: another identity."""
    path = tmp_path / "a.npy"
    np.save(path, np.zeros((3, 4, 4), np.uint8))
    first = input_identity(npy=str(path), labels=[0, 1, 2])
    assert input_identity(npy=str(path), labels=[0, 1, 2]) == first
    assert input_identity(npy=str(path), labels=[0, 1, 1]) != first
    np.save(tmp_path / "b.npy", np.zeros((3, 4, 4), np.uint8))
    assert input_identity(npy=str(tmp_path / "b.npy"), labels=[0, 1, 2]) != first
    os.utime(path, ns=(1, 1))  # the same bytes, written again later or earlier
    assert input_identity(npy=str(path), labels=[0, 1, 2]) != first


def test_a_rebuilt_network_with_other_weights_is_refused(tmp_path, images):
    """The weights file changed after fitting: an unpickled copy refuses to compute."""
    path = tmp_path / "resnet.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    extractor = FeatureExtractor("resnet18", weights=str(path), image_size=32).fit()
    data = pickle.dumps(extractor)
    np.testing.assert_array_equal(pickle.loads(data).transform(images), extractor.transform(images))
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    _shared_networks.clear()  # as in a new process: the network must be built again
    with pytest.raises(WeightsChangedError) as caught:
        pickle.loads(data).transform(images)
    message = str(caught.value)
    assert str(path) in message and extractor.weights_digest_ in message


def test_unpickled_copies_keep_the_precision_they_were_fitted_at(monkeypatch):
    """A copy never resolves "auto" again; one that cannot run its precision warns."""
    from skdeep import _device

    extractor = fitted(precision="auto", device="cpu")  # a CPU cannot run float16
    native = _device.cpu_has_native_bfloat16()
    monkeypatch.setattr(_device, "cpu_has_native_bfloat16", lambda: not native)
    copy = pickle.loads(pickle.dumps(extractor))
    assert copy.precision_ == extractor.precision_
    extractor.precision_ = torch.float16  # as if fitted on a GPU
    with pytest.warns(RuntimeWarning, match="fitted to compute in float16"):
        fallen_back = pickle.loads(pickle.dumps(extractor))
    assert fallen_back.precision_ != torch.float16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pickle.loads(pickle.dumps(fitted(precision="float32", device="cpu")))


class DoubledNet(TinyNet):
    """TinyNet whose forward doubles its input: equal parameters, other features."""

    def forward(self, x):
        """Classify twice the input."""
        return super().forward(2 * x)


class MaskedNet(TinyNet):
    """TinyNet with a non-persistent buffer that scales its input."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.register_buffer("scale", torch.tensor(scale), persistent=False)

    def forward(self, x):
        """Classify the scaled input."""
        return super().forward(self.scale * x)


def test_the_code_of_every_module_counts():
    """Another forward (a subclass, one set on the instance, one without source) counts."""
    torch.manual_seed(0)
    net = TinyNet()
    doubled = DoubledNet()
    doubled.load_state_dict(net.state_dict())
    patched = TinyNet()
    patched.load_state_dict(net.state_dict())
    patched.features[2].forward = lambda x: torch.relu(x) + 1  # on the instance
    hooked = TinyNet()
    hooked.load_state_dict(net.state_dict())
    hooked.features[2].register_forward_hook(lambda module, args, output: output * 3)
    namespace = {"TinyNet": TinyNet}
    exec(
        "class Net(TinyNet):\n    def forward(self, x):\n        return super().forward(x)",
        namespace,
    )
    exec_class = namespace["Net"]
    exec(
        "class Net(TinyNet):\n    def forward(self, x):\n        return super().forward(-x)",
        namespace,
    )
    negated = namespace["Net"]  # same name, no source file: told apart by bytecode
    networks = [net, doubled, patched, hooked, exec_class(), negated()]
    for network in networks[4:]:
        network.load_state_dict(net.state_dict())
    assert len({architecture_digest(m) for m in networks}) == len(networks)
    assert key(fitted(net)) != key(fitted(doubled))


def test_every_buffer_counts_persistent_or_not():
    """A non-persistent buffer (not in the state_dict) with another value: another key."""
    torch.manual_seed(0)
    plain, scaled = MaskedNet(1.0), MaskedNet(0.5)
    scaled.load_state_dict(plain.state_dict())
    assert "scale" not in plain.state_dict()
    assert architecture_digest(plain) != architecture_digest(scaled)
    assert key(fitted(plain)) != key(fitted(scaled))
    assert architecture_digest(MaskedNet(1.0)) == architecture_digest(plain)
