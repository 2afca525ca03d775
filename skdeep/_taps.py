"""Reading a network: forward hooks on named layers, pooling, and pooled features.

:class:`LayerFeatures` is the one way skdeep turns a batch into feature rows, for
all three estimators: ``FeatureExtractor.transform``, ``FineTuneClassifier.predict``
and ``transform`` (the layers ``"logits"`` and ``"penultimate"``) and the layers a
domain-adaptation penalty compares during training.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ._layouts import PROBE_IMAGES, ROWS, Layout, parse_layout, pool, resolve_layouts
from ._network import LOGITS, PENULTIMATE, check_input_size, find_head


def parse_layers(value, argument: str) -> list[str]:
    """Turn a layer parameter (one name or a sequence) into a list of distinct names.

    Raises
    ------
    ValueError
        ``value`` is empty, holds something other than strings, or repeats a name.
    """
    layers = [value] if isinstance(value, str) else value
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ValueError(
            f"{argument} must be a layer name or a non-empty list of them; got {value!r}"
        )
    if not all(isinstance(layer, str) for layer in layers):
        raise ValueError(f"{argument} must list layer names (strings); got {value!r}")
    if len(set(layers)) < len(layers):
        raise ValueError(f"{argument} must not repeat a name; got {value!r}")
    return list(layers)


class _StopForward(Exception):
    """Raised from a hook once every tapped layer has fired: the rest is not computed."""


class LayerTaps:
    """Context manager that records the outputs of named modules.

    Hooks are registered on entry and always removed on exit, so nothing is left on
    the module. ``"penultimate"`` taps the input of the classifier head and
    ``"logits"`` is the network's own output. Each output is kept as it is when its
    hook fires (a copy), so that an in-place operation later in the forward pass (a
    ``ReLU(inplace=True)``, a residual ``+=``) cannot change it.

    Parameters
    ----------
    module : nn.Module
        The network.
    layers : list of str
        Module names (``dict(module.named_modules())`` keys), ``"penultimate"`` or
        ``"logits"``.
    stop_after : str, optional
        Abort the forward pass as soon as this layer has fired (the deepest tap), so
        later layers are never computed.
    forward : callable, optional
        What the batches run through, when not ``module`` itself (a
        DistributedDataParallel wrapper of it, whose forward calls ``module``'s).
    """

    def __init__(
        self,
        module: nn.Module,
        layers: list[str],
        stop_after: str | None = None,
        forward=None,
    ):
        self.module = module
        self.forward = module if forward is None else forward
        self.layers = list(dict.fromkeys(layers))
        self.stop_after = stop_after
        self.outputs: dict[str, torch.Tensor] = {}
        self.calls: Counter = Counter()  # how often each layer fired in the last run
        self.order: list[str] = []  # layers in the order they first fired in the last run
        self._handles: list = []

    def __enter__(self) -> LayerTaps:
        if getattr(self.module, "returns_layers", False):
            return self  # an int8 graph returns its tapped layers itself
        for layer in self.layers:
            if layer == PENULTIMATE:
                _, head = find_head(self.module)
                hook = partial(self._record_input, layer)
                self._handles.append(head.register_forward_pre_hook(hook))
            elif layer != LOGITS:
                hook = partial(self._record_output, layer)
                target = self.module.get_submodule(layer)
                self._handles.append(target.register_forward_hook(hook))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _record_input(self, layer, module, args):
        self._record(layer, args[0])

    def _record_output(self, layer, module, args, output):
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"layers: {layer!r} returns a {type(output).__name__}, not a tensor; "
                "tap one of its submodules instead"
            )
        self._record(layer, output)

    def _record(self, layer: str, value: torch.Tensor) -> None:
        if layer not in self.outputs:
            self.order.append(layer)
        self.outputs[layer] = self._keep(layer, value)
        self.calls[layer] += 1
        if layer == self.stop_after:
            raise _StopForward

    def _keep(self, layer: str, value: torch.Tensor) -> torch.Tensor:
        """Keep a copy of an output when its hook fires, safe from later in-place changes."""
        return value.clone()

    def run(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """One forward pass; returns the tapped outputs by layer name."""
        self.outputs = {}
        self.calls.clear()
        self.order = []
        if getattr(self.module, "returns_layers", False):
            outputs = self.module(inputs)
            self.outputs = {layer: self._keep(layer, outputs[layer]) for layer in self.layers}
            return self.outputs
        try:
            output = self.forward(inputs)
        except _StopForward:
            pass
        else:
            if LOGITS in self.layers:
                self._record(LOGITS, output)
        missing = [layer for layer in self.layers if layer not in self.outputs]
        if missing:
            raise ValueError(
                f"layers: {missing} never ran in the forward pass of the backbone, so they "
                "give no features; choose modules that the forward pass calls"
            )
        return self.outputs


class LayerFeatures(LayerTaps):
    """Pooled features of named layers: batch in, one row per image out.

    Each layer is pooled according to its layout (see :mod:`skdeep._layouts`), which
    :func:`verified_layouts` works out once per network, as soon as its hook fires.

    Parameters
    ----------
    module, layers, stop_after, forward
        As in :class:`LayerTaps`.
    pooling : str or None
        How each layer's output becomes rows (see :func:`skdeep._layouts.pool`).
    layouts : dict, optional
        The layout of each layer (a :class:`~skdeep._layouts.Layout` or its text, such
        as ``"tokens:1:cls"``). Layers left out must give rows ``(B, D)``.

    Examples
    --------
    >>> import torch, torchvision
    >>> net = torchvision.models.resnet18().eval()
    >>> layers = ["layer3", "penultimate"]
    >>> _, layouts = verified_layouts(net, layers, "avg", size=64)
    >>> with LayerFeatures(net, layers, "avg", layouts=layouts) as features:
    ...     features(torch.zeros(2, 3, 64, 64)).shape
    torch.Size([2, 768])
    """

    def __init__(
        self,
        module: nn.Module,
        layers: list[str],
        pooling: str | None = "avg",
        stop_after: str | None = None,
        layouts: dict | None = None,
        forward=None,
    ):
        super().__init__(module, layers, stop_after, forward)
        self.pooling = pooling
        self.layouts = {
            layer: layout if isinstance(layout, Layout) else parse_layout(layout, layer)
            for layer, layout in (layouts or {}).items()
        }

    def _layout(self, layer: str, output: torch.Tensor) -> Layout:
        if layer in self.layouts:
            return self.layouts[layer]
        if output.ndim != 2:
            raise RuntimeError(
                f"the layout of {layer!r} (output of shape {tuple(output.shape)}) was not "
                "worked out: pass layouts from verified_layouts"
            )
        return Layout(ROWS)

    def _keep(self, layer: str, value: torch.Tensor) -> torch.Tensor:
        """Pool an output as soon as its hook fires, before anything later can change it."""
        return pool(value, self._layout(layer, value), self.pooling)

    def pooled(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run one forward pass; return each layer's pooled rows ``(B, D)`` by name, in order."""
        outputs = self.run(inputs)
        return {layer: outputs[layer] for layer in self.layers}

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        """Run one forward pass; return the pooled rows of all layers, concatenated."""
        return torch.cat(list(self.pooled(inputs).values()), dim=1)


@dataclass
class Probe:
    """What the tapped layers output for probe images (see :func:`probe_layers`).

    Attributes
    ----------
    size : int
        Height (and width) of the square probe images.
    inputs : tensor
        The square probe batch ``(2, 3, size, size)``.
    outputs : dict of tensors
        Each layer's output for ``inputs``.
    wide_outputs : dict of tensors or None
        Each layer's output for the same images twice as wide (None: the network
        refused them, as networks built for one input size do).
    deepest : str or None
        The tap that fires last: the forward pass can stop right after it (None when
        ``"logits"`` is tapped, which needs the whole network).
    """

    size: int
    inputs: torch.Tensor
    outputs: dict
    wide_outputs: dict | None
    deepest: str | None


def probe_layers(
    module: nn.Module, layers: list[str], size: int, device: torch.device | str = "cpu"
) -> Probe:
    """Run the network (in eval mode) on square and on wide probe images with every tap.

    The images are random but always the same, so that a check on the outputs means
    something (blank images make many maps constant).

    Raises
    ------
    ValueError
        The network does not take ``size`` x ``size`` images (the error names
        ``image_size``), or a tapped module runs more than once per forward pass (a
        reused activation, say), so that its output is ambiguous.
    """
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(PROBE_IMAGES, 3, size, size, generator=generator).to(device)
    with torch.inference_mode():
        try:
            with LayerTaps(module, layers) as taps:
                outputs = taps.run(inputs)
        except RuntimeError:
            check_input_size(module, size, device)  # names image_size if too small
            raise
        repeated = {layer: n for layer, n in taps.calls.items() if n > 1}
        if repeated:
            raise ValueError(
                f"layers: {repeated} run several times in one forward pass (the module is "
                "reused), so their output is ambiguous; tap the block that contains them"
            )
        deepest = None if taps.order[-1] == LOGITS else taps.order[-1]
        try:
            with LayerTaps(module, layers, stop_after=deepest) as taps:
                wide_outputs = taps.run(torch.cat([inputs, inputs.flip(-1)], dim=-1))
        except Exception:  # networks built for one input size refuse it: nothing to learn
            wide_outputs = None
    return Probe(size, inputs, outputs, wide_outputs, deepest)


def verified_layouts(
    module: nn.Module,
    layers: list[str],
    pooling: str | None,
    declared: dict | None = None,
    size: int = 224,
    device: torch.device | str = "cpu",
) -> tuple[Probe, dict[str, Layout]]:
    """Probe the network and work out the verified layout of each tapped layer.

    ``module`` must be in eval mode. See :func:`probe_layers` and
    :func:`skdeep._layouts.resolve_layouts`.
    """
    probe = probe_layers(module, layers, size, device)
    layouts = resolve_layouts(
        module, layers, probe.outputs, probe.wide_outputs, size, pooling, declared
    )
    return probe, layouts
