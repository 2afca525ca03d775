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

from . import _timm
from ._layouts import PROBE_IMAGES, ROWS, Layout, parse_layout, pool, resolve_layouts
from ._network import LOGITS, PENULTIMATE, check_input_size, head_names


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
    the module. ``"penultimate"`` is what the classifier head receives and ``"logits"``
    the network's output. For a timm model they are timm's own: the batch runs as
    ``forward_features``, then ``forward_head(..., pre_logits=True)`` gives the
    pre-logits (its global pooling; for distilled models the mean of the class and
    distillation tokens, for CrossViT both branches) and ``forward_head`` the logits.
    Elsewhere, and where the batches run through a wrapper (``forward``), a hook reads
    the input of the head (:func:`skdeep._network.head_names`; two heads that take
    inputs of one shape, as distilled timm models, give their mean).
    ``"intermediate:K"`` (see :func:`skdeep._timm.intermediate_module`) is the K-th
    output of the timm model's own ``forward_intermediates``, run after the forward
    pass with the hooks silent. Each output is kept as it is when its hook fires (a
    copy), so that an in-place operation later in the forward pass (a
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
        # Layers read through timm's forward_intermediates, by index.
        self.by_timm = {
            layer: index
            for layer in self.layers
            if (index := _timm.read_by_timm(layer)) is not None
        }
        self._head_inputs: dict[str, torch.Tensor] = {}
        self._recording = True
        # timm's own head reads "penultimate" and "logits" (not through a wrapper).
        self._timm_head = forward is None and _timm.has_timm_head(module)

    def __enter__(self) -> LayerTaps:
        if getattr(self.module, "returns_layers", False):
            return self  # an int8 graph returns its tapped layers itself
        for layer in self.layers:
            if layer == PENULTIMATE and not self._timm_head:
                heads = head_names(self.module)
                for head in heads:
                    hook = partial(self._record_head_input, head, len(heads))
                    target = self.module.get_submodule(head)
                    self._handles.append(target.register_forward_pre_hook(hook))
            elif layer not in (PENULTIMATE, LOGITS) and layer not in self.by_timm:
                hook = partial(self._record_output, layer)
                target = self.module.get_submodule(layer)
                self._handles.append(target.register_forward_hook(hook))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _record_head_input(self, head: str, count: int, module, args):
        """Record the penultimate rows: the head's input, or the mean of the heads' inputs."""
        if not self._recording:
            return
        self._head_inputs[head] = args[0]
        if len(self._head_inputs) == count:
            inputs = list(self._head_inputs.values())
            self._head_inputs = {}
            if len({tuple(value.shape) for value in inputs}) > 1:
                raise ValueError(
                    f"layers: 'penultimate' of this {type(self.module).__name__} joins the "
                    f"inputs of its classifiers {head_names(self.module)} "
                    "in a way of its own, which a hook cannot read (skdeep reads it with "
                    "timm's forward_head, which training through a wrapper, as with "
                    "devices, cannot use); tap a module by name instead"
                )
            # (x + x_dist) / 2 for two heads, exactly as timm's pre-logits are computed.
            self._record(PENULTIMATE, inputs[0] if count == 1 else sum(inputs) / count)

    def _record_output(self, layer, module, args, output):
        if not self._recording:
            return
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
        self._head_inputs = {}
        if getattr(self.module, "returns_layers", False):
            outputs = self.module(inputs)
            self.outputs = {layer: self._keep(layer, outputs[layer]) for layer in self.layers}
            return self.outputs
        if len(self.by_timm) < len(self.layers):  # layers that hooks read
            try:
                output = self._run_forward(inputs)
            except _StopForward:
                pass
            else:
                if LOGITS in self.layers:
                    self._record(LOGITS, output)
        if self.by_timm:
            self._read_intermediates(inputs)
        missing = [layer for layer in self.layers if layer not in self.outputs]
        if missing:
            raise ValueError(
                f"layers: {missing} never ran in the forward pass of the backbone, so they "
                "give no features; choose modules that the forward pass calls"
            )
        return self.outputs

    def _run_forward(self, inputs: torch.Tensor):
        """Run the batch; a timm model's "penultimate" is recorded on the way."""
        if not self._timm_head:
            return self.forward(inputs)
        features = self.module.forward_features(inputs)
        if PENULTIMATE in self.layers:
            self._record(PENULTIMATE, self.module.forward_head(features, pre_logits=True))
        return self.module.forward_head(features)

    def _read_intermediates(self, inputs: torch.Tensor) -> None:
        """Record the layers read through timm's ``forward_intermediates``."""
        indices = sorted(set(self.by_timm.values()))
        self._recording = False  # the hooks of other layers stay silent
        try:
            outputs = self.module.forward_intermediates(
                inputs, indices=indices, intermediates_only=True
            )
        finally:
            self._recording = True
        by_index = dict(zip(indices, outputs, strict=True))
        for layer, index in self.by_timm.items():
            self._record(layer, by_index[index])


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
        hooked = [layer for layer in taps.order if layer not in taps.by_timm]
        deepest = None if not hooked or hooked[-1] == LOGITS else hooked[-1]
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


def intermediate_readers(
    module: nn.Module,
    requested: list[str],
    resolved: list[str],
    declared: dict | None = None,
    size: int = 224,
    device: torch.device | str = "cpu",
) -> list[str]:
    """Choose how each timm ``"intermediate:N"`` is read: a hook, or ``forward_intermediates``.

    A hook on the module timm's ``feature_info`` names is kept where it gives timm's
    intermediate (the same spatial mean on the probe images: the hook may see tokens
    where timm returns a map); where it cannot (the module returns a tuple, never runs,
    or timm transforms its output), the layer becomes ``"intermediate:K"``, read
    through the model's own ``forward_intermediates``.

    Parameters
    ----------
    module : nn.Module
        The network (eval mode).
    requested, resolved : list of str
        The layers as asked for and as :func:`skdeep._network.resolve_layer_names`
        resolved them, in the same order.
    declared : dict, optional
        Declared layouts, keyed by resolved name.
    size, device
        As in :func:`verified_layouts`.

    Returns
    -------
    list of str
        ``resolved``, with the intermediates that hooks cannot read replaced.
    """
    if not hasattr(module, "forward_intermediates"):
        return list(resolved)
    declared = declared or {}
    chosen = list(resolved)
    for position, (layer, name) in enumerate(zip(requested, resolved, strict=True)):
        if not layer.startswith(_timm.INTERMEDIATE) or _timm.read_by_timm(name) is not None:
            continue
        index = _timm.intermediate_index(module, layer)
        try:
            layout = {name: declared[name]} if name in declared else None
            probe, layouts = verified_layouts(module, [name], None, layout, size, device)
        except (TypeError, ValueError):  # a tuple, a module that never runs, no layout
            chosen[position] = f"{_timm.INTERMEDIATE}{index}"
            continue
        try:
            expected = _timm.intermediate_means(module, index, probe.inputs)
        except Exception:  # timm's own method fails here: the hook it is
            continue
        if expected is None:
            continue
        ours = pool(probe.outputs[name], layouts[name], "avg").float()
        if ours.shape != expected.shape or not torch.allclose(ours, expected, 1e-3, 1e-4):
            chosen[position] = f"{_timm.INTERMEDIATE}{index}"
    return chosen


def check_timm_forward(module: nn.Module, size: int, device: torch.device | str = "cpu") -> None:
    """Check that a timm model's forward is ``forward_head(forward_features(x))``.

    skdeep reads a timm model's ``"penultimate"`` and ``"logits"`` that way (see
    :class:`LayerTaps`); one pass of two probe images (``size`` pixels) in eval mode
    checks it (:func:`skdeep._timm.check_forward`). Other networks are left alone.
    """
    if not _timm.has_timm_head(module):
        return
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(PROBE_IMAGES, 3, size, size, generator=generator).to(device)
    was_training = module.training
    module.eval()
    try:
        _timm.check_forward(module, inputs)
    finally:
        module.train(was_training)
