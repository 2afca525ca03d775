"""int8 feature extraction: post-training static quantization with PyTorch's FX mode.

``FeatureExtractor(precision="int8")`` calibrates in ``fit`` on the images it is
given and runs the network in int8 through oneDNN/fbgemm (the ``x86`` backend):

1. The float network becomes a graph that returns exactly the tapped layers
   (torchvision's ``create_feature_extractor``), so only what the taps need runs.
2. ``prepare_fx`` inserts observers; the calibration batches go through it.
3. ``convert_fx`` turns it into int8 kernels; the outputs come back in float.

What calibration learned (the activation observers' statistics) is all a pickle
stores: the int8 network is rebuilt from the float weights and these statistics where
the extractor is loaded, and gives identical features.

PyTorch has deprecated ``torch.ao.quantization`` in favour of torchao's PT2E flow;
the FX flow still works in the torch versions skdeep supports (see the README for
what was measured and why this path was kept).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .backbones import LOGITS, PENULTIMATE, find_head

BACKEND = "x86"


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

    names = _node_names(model, layers)
    try:
        graph = create_feature_extractor(model, return_nodes={n: n for n in names.values()})
    except Exception as exc:  # FX raises many kinds for code it cannot follow
        raise ValueError(
            f"precision='int8' needs a network that torch.fx can trace, and this one "
            f"cannot be ({type(exc).__name__}: {exc}); use precision='float32'"
        ) from exc
    return TappedGraph(graph, names)


def _qconfig_mapping():
    from torch.ao.quantization import get_default_qconfig_mapping

    return get_default_qconfig_mapping(BACKEND)


def prepare(graph: TappedGraph, example: torch.Tensor) -> TappedGraph:
    """Insert observers (the model to calibrate)."""
    from torch.ao.quantization.quantize_fx import prepare_fx

    torch.backends.quantized.engine = BACKEND
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notices of torch.ao.quantization
        prepared = prepare_fx(graph.graph, _qconfig_mapping(), example_inputs=(example,))
    return TappedGraph(prepared, graph.names)


def observer_state(prepared: TappedGraph) -> dict[str, torch.Tensor]:
    """Return the statistics the observers gathered (what a pickle stores)."""
    return {
        key: value.clone()
        for key, value in prepared.graph.state_dict().items()
        if "activation_post_process" in key
    }


def convert(prepared: TappedGraph, statistics: dict | None = None) -> TappedGraph:
    """Load observer ``statistics`` (when given) and convert to int8 kernels."""
    from torch.ao.quantization.quantize_fx import convert_fx

    if statistics is not None:
        prepared.graph.load_state_dict(statistics, strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = convert_fx(prepared.graph)
    return TappedGraph(quantized.eval(), prepared.names)
