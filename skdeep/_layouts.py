"""What the output of a tapped layer holds, and how each kind is pooled into rows.

A tapped module returns one of four layouts:

- ``channels_first`` maps ``(N, C, H, W)``: torchvision and timm CNNs;
- ``channels_last`` maps ``(N, H, W, C)``: torchvision and timm Swin stages, the
  LayerNorm and MLP inside ConvNeXt blocks;
- ``tokens`` ``(N, T, C)``: ViT, DeiT, DINOv2, EVA; the first ``prefix`` tokens are a
  class token (when ``class_token``) and register tokens, the rest patch tokens;
- ``rows`` ``(N, C)``.

The layout comes from the model's family and the module, never from the shape alone
(a ``(2, 7, 7, 768)`` output is a Swin stage's channels-last map, a ``(2, 768, 7, 7)``
one a CNN's). Modules that skdeep cannot place (inside window attention, say, whose
outputs are windows rather than images) raise an error that names the layer and says
how to declare its layout with the ``layouts`` parameter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

CHANNELS_FIRST = "channels_first"
CHANNELS_LAST = "channels_last"
TOKENS = "tokens"
ROWS = "rows"
MAP_POOLINGS = ("avg", "mean", "max", "avgmax", None)
TOKEN_POOLINGS = ("cls", "cls+mean", "mean", "avg", "max", "avgmax", None)
POOLINGS = ("avg", "max", "avgmax", "cls", "mean", "cls+mean", None)
_DECLARATION = re.compile(r"^(channels_first|channels_last|rows|tokens)(?::(\d+)(?::cls)?)?$")


@dataclass(frozen=True)
class Layout:
    """The layout of one layer's output.

    Attributes
    ----------
    kind : {"channels_first", "channels_last", "tokens", "rows"}
        See the module docstring.
    prefix : int
        Tokens only: how many leading tokens are not patch tokens (class and
        register tokens).
    class_token : bool
        Tokens only: whether the first token is a class token.
    """

    kind: str
    prefix: int = 0
    class_token: bool = False

    def __str__(self) -> str:
        if self.kind != TOKENS:
            return self.kind
        return f"{TOKENS}:{self.prefix}" + (":cls" if self.class_token else "")

    @property
    def ndim(self) -> int:
        """Dimensions of an output of this layout."""
        return {CHANNELS_FIRST: 4, CHANNELS_LAST: 4, TOKENS: 3, ROWS: 2}[self.kind]


def parse_layout(value: str, layer: str) -> Layout:
    """Read a ``layouts`` declaration: a kind, or ``"tokens:N"`` / ``"tokens:N:cls"``.

    ``N`` counts the leading class and register tokens; ``:cls`` says the first is a
    class token.
    """
    match = _DECLARATION.match(value) if isinstance(value, str) else None
    if match is None or (match[2] is not None and match[1] != TOKENS):
        raise ValueError(
            f"layouts: {value!r} for layer {layer!r} is not a layout; use 'channels_first', "
            "'channels_last', 'rows', 'tokens' or 'tokens:N' (N leading class and register "
            "tokens; 'tokens:N:cls' when the first is a class token)"
        )
    prefix = int(match[2] or 0)
    class_token = value.endswith(":cls")
    if class_token and prefix < 1:
        raise ValueError(f"layouts: {value!r} for layer {layer!r} has a class token among 0")
    return Layout(match[1], prefix, class_token)


# ----------------------------------------------------------------------------------------
# Family rules: which layout a module of a known model family returns
# ----------------------------------------------------------------------------------------

_UNKNOWN = Layout("unknown")  # a family rule that knows the module cannot be placed


def _inside(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _strict_descendant_of(model: nn.Module, name: str, kinds: tuple[type, ...]) -> bool:
    """Whether a module strictly above ``name`` (not ``name`` itself) is of ``kinds``."""
    parts = name.split(".")
    return any(
        isinstance(model.get_submodule(".".join(parts[:depth])), kinds)
        for depth in range(1, len(parts))
    )


def _torchvision_rule(model: nn.Module, name: str, module: nn.Module) -> Layout | None:
    from torchvision.models import convnext, maxvit, swin_transformer, vision_transformer

    if isinstance(model, swin_transformer.SwinTransformer):
        attention = (swin_transformer.ShiftedWindowAttention,)
        if _strict_descendant_of(model, name, attention):
            return _UNKNOWN  # windows of tokens, not images
        if isinstance(module, nn.Conv2d) or name in ("permute", "avgpool"):
            return Layout(CHANNELS_FIRST)
        if _inside(name, ("features", "norm")):
            return Layout(CHANNELS_LAST)
        return None
    if isinstance(model, vision_transformer.VisionTransformer):
        if _inside(name, ("encoder",)):
            return Layout(TOKENS, prefix=1, class_token=True)
        return None
    if isinstance(model, convnext.ConvNeXt):
        # CNBlock.block: conv, Permute, LayerNorm, Linear, GELU, Linear, Permute back.
        match = re.search(r"\.block\.(\d+)(\.|$)", name)
        if match and 1 <= int(match[1]) <= 5:
            return Layout(CHANNELS_LAST)
        return None
    if isinstance(model, maxvit.MaxVit):
        if _strict_descendant_of(model, name, (maxvit.PartitionAttentionLayer,)):
            return _UNKNOWN  # partitioned windows and grids
        return None
    return None


def _timm_rule(model: nn.Module, name: str, module: nn.Module) -> Layout | None:
    if not type(model).__module__.startswith("timm."):
        return None
    if isinstance(module, nn.Conv2d):
        return Layout(CHANNELS_FIRST)
    if hasattr(model, "num_prefix_tokens") and hasattr(model, "blocks"):  # ViT, DeiT, EVA
        if _inside(name, ("patch_embed",)):
            flat = getattr(getattr(model, "patch_embed", None), "flatten", True)
            return Layout(TOKENS) if flat else Layout(CHANNELS_LAST)
        if _inside(name, ("blocks", "norm_pre", "norm", "pos_drop", "patch_drop")):
            class_token = getattr(model, "cls_token", None) is not None
            return Layout(TOKENS, prefix=int(model.num_prefix_tokens), class_token=class_token)
        return None
    if getattr(model, "output_fmt", None) == "NHWC":  # Swin and its kin
        from timm.models import swin_transformer

        if _strict_descendant_of(model, name, (swin_transformer.WindowAttention,)):
            return _UNKNOWN
        if _inside(name, ("patch_embed", "layers", "norm")):
            return Layout(CHANNELS_LAST)
        return None
    from timm.models import convnext

    parts = name.split(".")
    for depth in range(1, len(parts)):
        block = model.get_submodule(".".join(parts[:depth]))
        if isinstance(block, convnext.ConvNeXtBlock) and not block.use_conv_mlp:
            if parts[depth] in ("norm", "mlp"):  # between the block's two permutes
                return Layout(CHANNELS_LAST)
    return None


def layer_layout(
    model: nn.Module, name: str, output: torch.Tensor, declared: dict | None = None
) -> Layout:
    """Return the layout of the output of layer ``name`` of ``model``.

    Parameters
    ----------
    model : nn.Module
        The network as built (before inference rewrites).
    name : str
        The layer (a module name, ``"penultimate"`` or ``"logits"``).
    output : tensor
        One output of the layer, to check that the layout fits it.
    declared : dict, optional
        The ``layouts`` parameter: layer name to declaration.

    Raises
    ------
    ValueError
        skdeep cannot tell the layout and none was declared, or the declared layout
        does not fit the output.
    """
    if declared and name in declared:
        layout = parse_layout(declared[name], name)
    elif output.ndim == 2:
        layout = Layout(ROWS)
    else:
        module = model.get_submodule(name) if name in dict(model.named_modules()) else None
        layout = None
        if module is not None:
            layout = _torchvision_rule(model, name, module) or _timm_rule(model, name, module)
        if layout is None and output.ndim == 4:
            layout = Layout(CHANNELS_FIRST)  # PyTorch's convention for image maps
        if layout is None or layout is _UNKNOWN:
            raise ValueError(
                f"layers: skdeep cannot tell the layout of {name!r} (output of shape "
                f"{tuple(output.shape)}) for this backbone; tap another layer, or say "
                f"which it is with layouts={{{name!r}: 'channels_first'}} (or "
                "'channels_last', 'rows', 'tokens', 'tokens:N' for N leading class or "
                "register tokens, 'tokens:N:cls' when the first is a class token)"
            )
    if output.ndim != layout.ndim:
        raise ValueError(
            f"layers: {name!r} gives an output of shape {tuple(output.shape)}, which is not "
            f"{layout.kind} ({layout.ndim} dimensions)"
        )
    return layout


# ----------------------------------------------------------------------------------------
# Pooling
# ----------------------------------------------------------------------------------------


def check_pooling(pooling: str | None, layout: Layout, layer: str) -> None:
    """Raise a ValueError when ``pooling`` does not apply to ``layout``."""
    if layout.kind == ROWS:
        return
    if layout.kind == TOKENS:
        allowed = TOKEN_POOLINGS
        if pooling in ("cls", "cls+mean") and not layout.class_token:
            raise ValueError(
                f"pooling={pooling!r}: {layer!r} has no class token ({layout}); use "
                "'mean', 'max' or None"
            )
    else:
        allowed = MAP_POOLINGS
    if pooling not in allowed:
        kind = "a token sequence" if layout.kind == TOKENS else "a map"
        raise ValueError(
            f"pooling={pooling!r} does not apply to {layer!r}, whose output is {kind}; "
            f"use one of {allowed}"
        )


def describe_layouts(
    model: nn.Module,
    layers: list[str],
    outputs: dict[str, torch.Tensor],
    pooling: str | None,
    declared: dict | None = None,
) -> dict[str, Layout]:
    """Work out the layout of each tapped layer, and check that ``pooling`` applies.

    ``outputs`` holds one output of each layer; ``declared`` is as in
    :func:`layer_layout`.
    """
    layouts = {}
    for layer in layers:
        layouts[layer] = layer_layout(model, layer, outputs[layer], declared)
        check_pooling(pooling, layouts[layer], layer)
    return layouts


def pool(output: torch.Tensor, layout: Layout, pooling: str | None) -> torch.Tensor:
    """Reduce one layer's output to rows ``(B, D)``.

    Maps: ``"avg"`` (or ``"mean"``), ``"max"`` and ``"avgmax"`` over the spatial axes.
    Tokens: ``"cls"`` (the class token), ``"mean"`` (or ``"avg"``) and ``"max"`` over
    the patch tokens (class and register tokens left out), ``"cls+mean"``, and
    ``"avgmax"`` (mean and max of the patch tokens). ``None`` flattens. Rows are
    returned as they are.
    """
    if layout.kind == ROWS:
        return output
    if pooling is None:
        return output.flatten(1)
    if layout.kind == TOKENS:
        patches = output[:, layout.prefix :]
        parts = {
            "cls": lambda: [output[:, 0]],
            "cls+mean": lambda: [output[:, 0], patches.mean(1)],
            "mean": lambda: [patches.mean(1)],
            "avg": lambda: [patches.mean(1)],
            "max": lambda: [patches.amax(1)],
            "avgmax": lambda: [patches.mean(1), patches.amax(1)],
        }[pooling]()
        return torch.cat(parts, dim=1)
    dims = (2, 3) if layout.kind == CHANNELS_FIRST else (1, 2)
    if pooling in ("avg", "mean"):
        return output.mean(dims)
    if pooling == "max":
        return output.amax(dims)
    return torch.cat([output.mean(dims), output.amax(dims)], dim=1)


def pooled_names(layer: str, shape: tuple[int, ...], layout: Layout, pooling) -> list[str]:
    """Name the columns of one layer's pooled output, e.g. ``layer4_avg_0``."""
    if layout.kind == ROWS:
        return [f"{layer}_{i}" for i in range(shape[1])]
    if pooling is None:
        width = 1
        for size in shape[1:]:
            width *= size
        return [f"{layer}_{i}" for i in range(width)]
    channels = {CHANNELS_FIRST: shape[1], CHANNELS_LAST: shape[-1], TOKENS: shape[-1]}
    kinds = {
        "avgmax": ("avg", "max") if layout.kind != TOKENS else ("mean", "max"),
        "cls+mean": ("cls", "mean"),
        "avg": ("avg",) if layout.kind != TOKENS else ("mean",),
        "mean": ("mean",) if layout.kind == TOKENS else ("avg",),
    }.get(pooling, (pooling,))
    return [f"{layer}_{kind}_{i}" for kind in kinds for i in range(channels[layout.kind])]
