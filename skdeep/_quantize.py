"""int8 feature extraction: post-training static quantization with PyTorch's FX mode.

``FeatureExtractor(precision="int8")`` calibrates in ``fit`` on the images it is
given and runs the network in int8 through fbgemm/oneDNN (the ``x86`` backend):

1. The float network becomes a graph that returns exactly the tapped layers
   (torchvision's ``create_feature_extractor``), so only what the taps need runs.
2. ``prepare_fx`` folds batch norms and inserts observers; the calibration batches
   go through it. In the same pass, each layer's bias is corrected for the error that
   rounding its weights will make, on average, on these images (empirical bias
   correction, Nagel et al. 2019, "Data-Free Quantization").
3. ``convert_fx`` turns it into int8 kernels; the outputs come back in float.

The choices, measured on MobileNet-V2 with ImageNet weights (docs/benchmarks/int8.md):

- Activations use all 8 bits (histogram observer, on a sample of each batch); weights
  are rounded per output channel to integers in [-64, 64], about 7 bits. CPUs without
  VNNI (AVX2, AVX-512 without VNNI) add pairs of uint8 x int8 products in int16 with
  saturation, and 2 * 255 * 64 stays below 2**15, so no CPU saturates and every CPU
  computes the same features. PyTorch's default (7-bit activations, 8-bit weights)
  avoids saturation too but loses more: activations are quantized per tensor, weights
  per channel.
- The first convolution (or linear layer) stays in float: it sees the raw normalized
  pixels, and quantizing it cost the most on images unlike the calibration ones.
- Transposed convolutions stay in float (their int8 weights are per tensor and 8-bit).

What calibration learned (the activation observers' statistics and the corrected
biases) is all a pickle stores: the int8 network is rebuilt from the float weights and
these where the extractor is loaded, and gives identical features.

PyTorch has deprecated ``torch.ao.quantization`` in favour of torchao's PT2E flow;
the FX flow still works in the torch versions skdeep supports (see docs/benchmarks/int8.md
for what was measured and why this path was kept).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from ._compat import conv_forward
from ._network import LOGITS, PENULTIMATE, find_head, head_names
from ._timm import read_by_timm

BACKEND = "x86"
WEIGHT_RANGE = (-64, 64)  # see the module docstring
# Values of each calibration batch that go into an activation histogram (see below).
HISTOGRAM_SAMPLE = 1 << 20
WEIGHTED_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
TRANSPOSED_CONVOLUTIONS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class TappedGraph(nn.Module):
    """A network that returns the outputs of the tapped layers as a dict."""

    returns_layers = True

    def __init__(self, graph: nn.Module, names: dict[str, str]):
        super().__init__()
        self.graph = graph
        self.names = names  # layer -> output key of the graph

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the network; return each tapped layer's output by layer name."""
        outputs = self.graph(x)
        return {layer: outputs[key] for layer, key in self.names.items()}


def _node_names(model: nn.Module, layers: list[str]) -> dict[str, str]:
    """Map each layer to the graph node whose output it is."""
    from torchvision.models.feature_extraction import get_graph_node_names

    _, nodes = get_graph_node_names(model)
    names = {}
    for layer in layers:
        if layer == LOGITS:
            names[layer] = nodes[-1]
        elif layer == PENULTIMATE:
            head_name, _ = find_head(model)
            position = max(i for i, node in enumerate(nodes) if node.startswith(head_name))
            names[layer] = nodes[position - 1]  # the node that feeds the head
        else:
            names[layer] = layer
    return names


def tapped_graph(model: nn.Module, layers: list[str]) -> TappedGraph:
    """Trace ``model`` into a graph that computes only what ``layers`` need.

    Raises
    ------
    ValueError
        The network cannot be traced (dynamic control flow), so it cannot be quantized.
    """
    from torchvision.models.feature_extraction import create_feature_extractor

    by_timm = [layer for layer in layers if read_by_timm(layer) is not None]
    if by_timm:
        raise ValueError(
            f"layers: {by_timm} are read through timm's forward_intermediates, which "
            "precision='int8' cannot quantize; use precision='float32', or tap modules by name"
        )
    if PENULTIMATE in layers and len(head_names(model)) > 1:
        raise ValueError(
            f"layers: 'penultimate' of this {type(model).__name__} is the mean of the inputs "
            f"of its classifiers {head_names(model)}, which precision='int8' cannot tap; use "
            "precision='float32'"
        )
    try:
        names = _node_names(model, layers)
        graph = create_feature_extractor(model, return_nodes={n: n for n in names.values()})
    except Exception as exc:  # FX raises many kinds for code it cannot follow
        raise ValueError(
            f"precision='int8' needs a network that torch.fx can trace, and this one "
            f"cannot be ({type(exc).__name__}: {exc}); use precision='float32'"
        ) from exc
    return TappedGraph(graph.eval(), names)


def _first_weighted_layer(graph: nn.Module) -> str | None:
    """Name of the first convolution or linear layer the graph runs.

    Tracing keeps some blocks whole (torchvision's ``Conv2dNormActivation``), so the
    layer may be inside the first module the graph calls; a block's layers are taken
    to run in the order they were registered, as in ``nn.Sequential``.
    """
    for node in graph.graph.nodes:
        if node.op == "call_module":
            block = graph.get_submodule(node.target)
            for name, module in block.named_modules(prefix=node.target):
                if isinstance(module, WEIGHTED_LAYERS):
                    return name
    return None


def _weight_observer():
    from torch.ao.quantization import PerChannelMinMaxObserver

    low, high = WEIGHT_RANGE
    return PerChannelMinMaxObserver.with_args(
        dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=low, quant_max=high
    )


@functools.cache
def _sampled_histogram_observer() -> type:
    """PyTorch's HistogramObserver, fed at most ``HISTOGRAM_SAMPLE`` values per batch.

    ``torch.histc`` was most of the calibration time. An evenly strided sample of each
    batch's activations, with their exact minimum and maximum, keeps the observed range
    and gave MobileNet-V2 features at least as close to float32 as the full histograms
    did (docs/benchmarks/int8.md), in less time. Defined on first use, so that only the
    int8 path imports ``torch.ao.quantization``.
    """
    from torch.ao.quantization import HistogramObserver

    class SampledHistogramObserver(HistogramObserver):
        def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
            values = x_orig.detach()
            if values.numel() > HISTOGRAM_SAMPLE:
                step = -(-values.numel() // HISTOGRAM_SAMPLE) | 1  # odd: no aliasing
                extremes = torch.stack(torch.aminmax(values))
                values = torch.cat([values.flatten()[::step], extremes])
            super().forward(values)
            return x_orig

    return SampledHistogramObserver


def _qconfig_mapping(float_layer: str | None):
    from torch.ao.quantization import QConfig, get_default_qconfig_mapping

    # The defaults keep their special cases (fixed ranges of sigmoid, tanh, ...).
    mapping = get_default_qconfig_mapping(BACKEND)
    activation = _sampled_histogram_observer().with_args(reduce_range=False)
    mapping.set_global(QConfig(activation=activation, weight=_weight_observer()))
    for kind in TRANSPOSED_CONVOLUTIONS:
        mapping.set_object_type(kind, None)
    if float_layer is not None:
        mapping.set_module_name(float_layer, None)
    return mapping


class QuantizableGraph(TappedGraph):
    """A tapped graph with observers, and the layers whose weights become int8."""

    def __init__(self, graph: nn.Module, names: dict[str, str], float_layer: str | None):
        super().__init__(graph, names)
        self.quantized_layers = {
            name: module
            for name, module in graph.named_modules()
            if isinstance(module, WEIGHTED_LAYERS)
            and not (float_layer and (name == float_layer or name.startswith(float_layer + ".")))
        }
        for module in self.quantized_layers.values():
            if module.bias is None:  # bias correction needs one
                out_features = module.weight.shape[0]
                module.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False)


def prepare(graph: TappedGraph, example: torch.Tensor) -> QuantizableGraph:
    """Fold batch norms and insert observers (the model to calibrate)."""
    from torch.ao.quantization.quantize_fx import prepare_fx

    float_layer = _first_weighted_layer(graph.graph)
    with quantized_engine(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notices of torch.ao.quantization
        prepared = prepare_fx(graph.graph, _qconfig_mapping(float_layer), (example,))
    return QuantizableGraph(prepared, graph.names, float_layer)


def calibrate(prepared: QuantizableGraph, batches: Iterable[torch.Tensor]) -> dict:
    """Observe ``batches`` and correct the biases; return what calibration learned."""
    layers = prepared.quantized_layers
    errors = {name: _WeightRoundingError(layer) for name, layer in layers.items()}
    handles = [layers[name].register_forward_hook(error) for name, error in errors.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                prepared(batch)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        for name, error in errors.items():
            layers[name].bias -= error.mean()
    bias_keys = {f"{name}.bias" for name in layers}
    return {
        key: value.clone()
        for key, value in prepared.graph.state_dict().items()
        if "activation_post_process" in key or key in bias_keys
    }


class _WeightRoundingError:
    """Forward hook: the mean output error, per channel, of the layer's rounded weights."""

    def __init__(self, layer: nn.Module):
        weight = layer.weight.detach()
        observer = _weight_observer()()
        observer(weight)
        scale, zero_point = observer.calculate_qparams()
        with warnings.catch_warnings():  # quantized tensors are deprecated
            warnings.simplefilter("ignore")
            # Rounded exactly as convert_fx will round them.
            rounded = torch.quantize_per_channel(weight, scale, zero_point, 0, torch.qint8)
        rounded = rounded.dequantize()
        self.weight_error = rounded - weight
        self.channel_dim = -1 if isinstance(layer, nn.Linear) else 1
        self.total = torch.zeros(weight.shape[0], dtype=torch.float64)
        self.count = 0

    def __call__(self, layer: nn.Module, args: tuple, output: torch.Tensor) -> None:
        (inputs,) = args
        if isinstance(layer, nn.Linear):
            error = nn.functional.linear(inputs, self.weight_error)
        else:  # the convolution itself, with its padding mode, but these weights
            error = conv_forward(layer, inputs, self.weight_error, None)
        dims = [d for d in range(error.dim()) if d != self.channel_dim % error.dim()]
        self.total += error.sum(dims).double()
        self.count += error.numel() // error.shape[self.channel_dim]

    def mean(self) -> torch.Tensor:
        return (self.total / max(self.count, 1)).float()


def convert(prepared: QuantizableGraph, calibration: dict | None = None) -> TappedGraph:
    """Load a ``calibration`` (when given) and convert to int8 kernels.

    Raises
    ------
    ValueError
        The calibration does not fit the network, or an observer lacks its statistics
        (it saw no data, or the calibration leaves it out): converting would quantize
        that layer with a made-up range.
    """
    from torch.ao.quantization.quantize_fx import convert_fx

    if calibration is not None:
        result = prepared.graph.load_state_dict(calibration, strict=False)
        if result.unexpected_keys:
            raise ValueError(
                f"the int8 calibration does not fit this network: it has "
                f"{result.unexpected_keys[:3]} that the network lacks"
            )
        expected = {key for key in prepared.graph.state_dict() if _is_calibrated(key, prepared)}
        missing = sorted(expected - set(calibration))
        if missing:
            raise ValueError(
                f"the int8 calibration is incomplete: it lacks {len(missing)} of the "
                f"statistics the network needs ({missing[:3]}); fit the extractor again"
            )
    unobserved = [
        name
        for name, module in prepared.graph.named_modules()
        if "activation_post_process" in name
        and isinstance(getattr(module, "min_val", None), torch.Tensor)
        and not bool(torch.isfinite(module.min_val).all() and module.min_val.numel())
    ]
    if unobserved:
        raise ValueError(
            f"int8 calibration: {len(unobserved)} observers saw no data ({unobserved[:3]}), "
            "so their layers have no range to quantize with; calibrate on images that "
            "reach every tapped layer"
        )
    with quantized_engine(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notices of torch.ao.quantization
        quantized = convert_fx(prepared.graph)
    return QuantizedGraph(quantized.eval(), prepared.names)


def _is_calibrated(key: str, prepared: QuantizableGraph) -> bool:
    """Whether a state_dict entry is learned by calibration (observers, corrected biases)."""
    return (
        "activation_post_process" in key or key.removesuffix(".bias") in prepared.quantized_layers
    )


class QuantizedGraph(TappedGraph):
    """An int8 tapped graph: runs its kernels on the x86 quantized engine."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the network; return each tapped layer's output by layer name."""
        with quantized_engine():
            return super().forward(x)


@contextlib.contextmanager
def quantized_engine():
    """Select PyTorch's x86 quantized engine inside the block, and restore the previous one.

    The engine is a process-wide setting (``torch.backends.quantized.engine``); skdeep
    sets it only while it prepares, converts or runs an int8 network, so the caller's
    own quantized models keep theirs.
    """
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = BACKEND
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous
