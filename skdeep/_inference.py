"""Rewrites that speed up a frozen network for inference, keeping its module names.

Both rewrites find their patterns on an FX trace, then change the module tree in place
(never the forward code), so every named module still exists and hooks on it still
fire with the same values:

1. :func:`fold_batch_norms`: a BatchNorm right after a convolution is folded into the
   convolution's weights and becomes ``nn.Identity``.
2. :func:`fuse_conv_activations` (CPU): a convolution and the activation after it run
   as one oneDNN call, and the activation becomes ``nn.Identity``. In bfloat16 the
   stand-alone activations cost as much as the convolutions themselves (ReLU6 took
   47% of MobileNet-V2's time), so this nearly doubles its throughput.

Modules named in ``keep`` (tapped layers) and modules called more than once per
forward pass are left as they are. A network FX cannot trace is left unchanged.
"""

from __future__ import annotations

import functools
from collections import Counter

import torch
from torch import nn

from ._compat import convolution_pointwise
from ._network import set_submodule

# Activation modules oneDNN can apply inside a convolution: (attribute, scalars).
_FUSABLE_ACTIVATIONS = {
    nn.ReLU: lambda m: ("relu", []),
    nn.ReLU6: lambda m: ("hardtanh", [0.0, 6.0]),
    nn.Hardtanh: lambda m: ("hardtanh", [float(m.min_val), float(m.max_val)]),
    nn.SiLU: lambda m: ("swish", []),
    nn.Hardswish: lambda m: ("hardswish", []),
    nn.Sigmoid: lambda m: ("sigmoid", []),
}


def optimize_for_inference(
    module: nn.Module,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    keep: frozenset[str] = frozenset(),
) -> nn.Module:
    """Rewrite a frozen network for fast inference, in place.

    Batch norms are folded, convolutions fused with their activations (CPU), and
    convolution and linear weights stored in the compute ``dtype``.

    ``module`` must be frozen (eval mode, no gradients) and is changed in place.
    """
    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception:  # dynamic control flow: no graph rewrites
        graph = None
    if graph is not None:
        fold_batch_norms(module, graph, keep)
        if device.type == "cpu" and fused_convolution_available(dtype):
            fuse_conv_activations(module, graph, keep)
    cast_matmul_weights(module, dtype)
    return module


def cast_matmul_weights(module: nn.Module, dtype: torch.dtype) -> None:
    """Store the weights of convolutions and linear layers in ``dtype``.

    Autocast runs these layers in ``dtype`` anyway, but it casts frozen weights again
    on every call (its cast cache only holds tensors that require gradients). Other
    layers (norms, for example) keep float32 weights, so the numbers are autocast's.
    """
    if dtype == torch.float32:
        return
    for layer in module.modules():
        # Exact types: subclasses (attention's output projection, say) may be used
        # through functions that expect their weights to match their neighbours'.
        if type(layer) in (nn.Conv2d, FusedConv2d, nn.Linear):
            layer.to(dtype)


def _calls(graph: torch.fx.Graph) -> Counter:
    return Counter(node.target for node in graph.nodes if node.op == "call_module")


def _convolution_before(node, modules, calls, keep) -> tuple[str, list[str]] | None:
    """Find the convolution whose output alone feeds ``node``, skipping Identity modules.

    Returns its name and the Identity modules in between, or None when the pattern
    does not hold (other users, reused or kept modules).
    """
    between = []
    producer = node.args[0] if node.args else None
    while True:
        if not (
            isinstance(producer, torch.fx.Node)
            and producer.op == "call_module"
            and len(producer.users) == 1
            and calls[producer.target] == 1
            and producer.target not in keep
        ):
            return None
        kind = type(modules[producer.target])
        if kind is nn.Conv2d:
            return producer.target, between
        if kind is not nn.Identity:
            return None
        between.append(producer.target)
        producer = producer.args[0]


def fold_batch_norms(module: nn.Module, graph: torch.fx.Graph, keep=frozenset()) -> None:
    """Fold each BatchNorm2d that directly follows a Conv2d into that Conv2d."""
    modules = dict(module.named_modules())
    calls = _calls(graph)
    for node in graph.nodes:
        norm = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(norm, nn.BatchNorm2d) or calls[node.target] != 1:
            continue
        found = _convolution_before(node, modules, calls, keep)
        if found is None or found[1] or not norm.track_running_stats:
            continue
        conv_name = found[0]
        modules[conv_name] = torch.nn.utils.fusion.fuse_conv_bn_eval(modules[conv_name], norm)
        modules[node.target] = nn.Identity()
        set_submodule(module, conv_name, modules[conv_name])
        set_submodule(module, node.target, modules[node.target])


class FusedConv2d(nn.Conv2d):
    """A Conv2d followed by an activation, computed by one oneDNN call (inference only).

    Parameter names are those of the Conv2d it replaces.
    """

    activation: str = "relu"
    scalars: tuple[float, ...] = ()

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, activation: str, scalars: list) -> FusedConv2d:
        fused = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        fused.load_state_dict(conv.state_dict())
        fused.activation, fused.scalars = activation, tuple(scalars)
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Autocast does not know this op, so cast the way it casts a convolution.
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return convolution_pointwise(
            x.to(dtype),
            self.weight.to(dtype),
            bias,
            self.padding,
            self.stride,
            self.dilation,
            self.groups,
            self.activation,
            self.scalars,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"


def fuse_conv_activations(module: nn.Module, graph: torch.fx.Graph, keep=frozenset()) -> None:
    """Run each Conv2d and the activation module right after it as one oneDNN call."""
    modules = dict(module.named_modules())
    calls = _calls(graph)
    for node in graph.nodes:
        activation = modules.get(node.target) if node.op == "call_module" else None
        describe = _FUSABLE_ACTIVATIONS.get(type(activation))
        if describe is None or calls[node.target] != 1:
            continue
        found = _convolution_before(node, modules, calls, keep)
        if found is None:
            continue
        conv_name = found[0]
        conv = modules[conv_name]  # a plain nn.Conv2d: _convolution_before checks it
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            continue
        modules[conv_name] = FusedConv2d.from_conv(conv, *describe(activation))
        modules[node.target] = nn.Identity()
        set_submodule(module, conv_name, modules[conv_name])
        set_submodule(module, node.target, modules[node.target])


@functools.cache
def fused_convolution_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether oneDNN's fused convolution runs here in ``dtype``.

    CPU builds of PyTorch have it in float32; in bfloat16 it needs AVX512 or
    AVX-NE-CONVERT (an AVX2-only CPU raises "bf16 path needs the cpu support").
    """
    try:
        conv = nn.Conv2d(1, 1, 1).to(dtype)
        FusedConv2d.from_conv(conv, "relu", [])(torch.zeros(1, 1, 2, 2, dtype=dtype))
        return True
    except Exception:  # no oneDNN, or an op signature this code does not know
        return False
