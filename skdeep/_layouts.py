"""What the output of a tapped layer holds, and how each kind is pooled into rows.

A tapped module returns one of four layouts:

- ``channels_first`` maps ``(N, C, H, W)``: torchvision and timm CNNs;
- ``channels_last`` maps ``(N, H, W, C)``: torchvision and timm Swin stages, the
  LayerNorm and MLP inside ConvNeXt blocks;
- ``tokens`` ``(N, T, C)``: ViT, DeiT, DINOv2, EVA; the first ``prefix`` tokens are a
  class token (when ``class_token``) and register tokens, the rest patch tokens;
- ``rows`` ``(N, C)``.

The shape alone cannot tell them apart (a ``(2, 7, 7, 768)`` output is a Swin stage's
channels-last map, a ``(2, 768, 7, 7)`` one a CNN's, and a ``(2, 49, 448)`` one
tokens), so a layout is never guessed from it. Two sources are joined instead:

- what the model says: rules of the model family (torchvision's ViT, Swin, ConvNeXt;
  timm's token models) and the model's own declarations (timm's ``output_fmt`` and
  ``feature_info``), or the user's ``layouts`` parameter;
- what a probe measures (:func:`measure_layout`): the network runs once on square
  images and once on images twice as wide. The axes that change are spatial; the one
  that does not holds the channels (where the width probe is refused, the channel count
  the model declares places them); a token sequence's leading class and register tokens
  are those that do not multiply with the patch grid.

:func:`resolve_layouts` raises an error that names the layer and asks for the
``layouts`` parameter when the two disagree or neither can tell (inside window
attention, say, whose outputs are windows rather than images).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from ._timm import read_by_timm

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
    prefix : int or None
        Tokens only: how many leading tokens are not patch tokens (class and
        register tokens); None while a rule leaves the count to be measured.
    class_token : bool
        Tokens only: whether the first token is a class token.
    """

    kind: str
    prefix: int | None = 0
    class_token: bool = False

    def __str__(self) -> str:
        if self.kind != TOKENS or self.prefix is None:  # None: a count still to measure
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
# What the model says: rules by family, and the model's own declarations
# ----------------------------------------------------------------------------------------

_UNKNOWN = Layout("unknown")  # a rule that knows the module cannot be placed


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


def _feature_info_entry(model: nn.Module, name: str) -> dict | None:
    """Return the entry of timm's ``feature_info`` for module ``name``, if it lists one.

    ``"intermediate:K"`` (read through ``forward_intermediates``) is its K-th entry.
    """
    info = getattr(model, "feature_info", None)
    index = read_by_timm(name)
    if index is not None and isinstance(info, list) and index < len(info):
        return info[index] if isinstance(info[index], dict) else None
    if isinstance(info, list):
        for entry in info:
            if isinstance(entry, dict) and entry.get("module") == name:
                return entry
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
            # How many tokens lead is measured: some of these models (CaiT, XCiT) add
            # their class token only after the blocks.
            class_token = getattr(model, "cls_token", None) is not None
            return Layout(TOKENS, prefix=None, class_token=class_token)
        return None
    if getattr(model, "output_fmt", None) == "NHWC":  # Swin, MambaOut, Sequencer, ...
        from timm.models import swin_transformer

        if _strict_descendant_of(model, name, (swin_transformer.WindowAttention,)):
            return _UNKNOWN
        if _feature_info_entry(model, name) is not None:
            return Layout(CHANNELS_LAST)  # the model declares its features channels-last
        return None
    from timm.models import convnext

    parts = name.split(".")
    for depth in range(1, len(parts)):
        block = model.get_submodule(".".join(parts[:depth]))
        if isinstance(block, convnext.ConvNeXtBlock) and not block.use_conv_mlp:
            if parts[depth] in ("norm", "mlp"):  # between the block's two permutes
                return Layout(CHANNELS_LAST)
    return None


def stated_layout(model: nn.Module, name: str) -> Layout | None:
    """Return what the model's family or declarations say ``name`` outputs (None: nothing)."""
    if read_by_timm(name) is not None:
        # timm's forward_intermediates returns maps (N, C, H, W) unless told otherwise.
        return Layout(CHANNELS_FIRST)
    modules = dict(model.named_modules())
    if name not in modules:
        return None  # "penultimate" and "logits": rows, measured
    module = modules[name]
    return _torchvision_rule(model, name, module) or _timm_rule(model, name, module)


# ----------------------------------------------------------------------------------------
# What a probe measures: which axes follow the input, where the channels are
# ----------------------------------------------------------------------------------------

PROBE_IMAGES = 2
"""Images in each probe batch: the first axis of every tapped output must have as many."""


@dataclass(frozen=True)
class Measurement:
    """The layout a probe shows (None: it cannot tell), and the evidence in words."""

    layout: Layout | None
    evidence: str


def channel_count(model: nn.Module, name: str) -> int | None:
    """Return the number of channels module ``name`` outputs, where the model says it.

    timm's ``feature_info`` gives it for the modules it lists; otherwise it is the
    output width of the module's last registered layer with one (a convolution, a
    linear layer or a norm). None when neither tells.
    """
    entry = _feature_info_entry(model, name)
    if entry is not None and isinstance(entry.get("num_chs"), int):
        return entry["num_chs"]
    modules = dict(model.named_modules())
    if name not in modules:
        return None
    for layer in reversed(list(modules[name].modules())):
        for attribute in ("out_channels", "out_features", "num_features", "num_channels"):
            if isinstance(getattr(layer, attribute, None), int):
                return getattr(layer, attribute)
        if isinstance(layer, nn.LayerNorm):
            return int(layer.normalized_shape[-1])
    return None


def patch_size(model: nn.Module, name: str) -> int | None:
    """Return the pixels per token of module ``name``'s output, where the model says it."""
    entry = _feature_info_entry(model, name)
    if entry is not None and isinstance(entry.get("reduction"), int):
        return entry["reduction"]
    size = getattr(model, "patch_size", None)  # torchvision's ViT
    if size is None:
        size = getattr(getattr(model, "patch_embed", None), "patch_size", None)  # timm's
    if isinstance(size, (tuple, list)) and len(set(size)) == 1:
        size = size[0]
    return size if isinstance(size, int) else None


def _leading_tokens(tokens: int, wide_tokens: int | None, size: int, patch: int | None):
    """Count the tokens that lead the patch tokens (class, register), or None.

    From the probes: with the width doubled, an h x h patch grid becomes h x 2h while
    leading tokens stay. From the model: a grid of ``size / patch`` patches a side.
    Every estimate available must agree.
    """
    estimates = []
    if wide_tokens is not None:
        lead = 2 * tokens - wide_tokens
        side = math.isqrt(max(tokens - lead, 0))
        if 0 <= lead < tokens and side * side == tokens - lead and (wide_tokens - lead) % side == 0:
            estimates.append({lead})
    if patch:
        grids = {size // patch, -(-size // patch)}
        estimates.append({tokens - g * g for g in grids if tokens - g * g >= 0})
    common = set.intersection(*estimates) if estimates else set()
    return common.pop() if len(common) == 1 else None


def measure_layout(
    output: torch.Tensor,
    wide: torch.Tensor | None,
    size: int,
    channels: int | None = None,
    patch: int | None = None,
) -> Measurement:
    """Measure the layout of a tapped output from two probes.

    Parameters
    ----------
    output : tensor
        The output for :data:`PROBE_IMAGES` images of ``size`` x ``size`` pixels.
    wide : tensor or None
        The output for images of ``size`` x ``2 * size`` (None: the network refused
        them). The axes that change with the image width are spatial; the channels
        are the axis that does not.
    size : int
        The height (and width) of the square probe.
    channels : int, optional
        The channel count the model declares for this output (see
        :func:`channel_count`), used where the width probe cannot tell.
    patch : int, optional
        Pixels per token (see :func:`patch_size`), to count leading tokens.
    """
    shape = tuple(output.shape)
    if shape[0] != PROBE_IMAGES:
        return Measurement(
            None,
            f"its first axis has {shape[0]} entries for {PROBE_IMAGES} images, so it does "
            "not hold one entry per image (windows or partitions of images?)",
        )
    if output.ndim == 2:
        return Measurement(Layout(ROWS), "it is 2-D")
    if output.ndim not in (3, 4):
        return Measurement(None, f"it has {output.ndim} dimensions")
    changed = None
    if wide is not None and wide.ndim == output.ndim and wide.shape[0] == shape[0]:
        changed = [axis for axis in range(1, output.ndim) if wide.shape[axis] != shape[axis]]
    if output.ndim == 4:
        if changed == [3]:
            return Measurement(Layout(CHANNELS_FIRST), "its last axis follows the image width")
        if changed == [2]:
            return Measurement(Layout(CHANNELS_LAST), "its third axis follows the image width")
        if changed:
            return Measurement(None, f"axes {changed} change with the image width")
        # The width probe was refused, or the map does not follow the input (pooled).
        at = [axis for axis in (1, 3) if shape[axis] == channels] if channels else []
        if not channels and shape[2] == 1 and (shape[1] == 1) != (shape[3] == 1):
            at = [1] if shape[3] == 1 else [3]  # (N, C, 1, 1) or (N, 1, 1, C)
        if at == [1]:
            return Measurement(Layout(CHANNELS_FIRST), f"its second axis holds {shape[1]} channels")
        if at == [3]:
            return Measurement(Layout(CHANNELS_LAST), f"its last axis holds {shape[3]} channels")
        return Measurement(None, "neither the image width nor the channel count places its axes")
    if changed is not None and changed not in ([1], []):
        return Measurement(None, f"axes {changed} change with the image width")
    if changed == [1] or (changed is None and channels and shape[2] == channels != shape[1]):
        wide_tokens = None if changed is None else wide.shape[1]
        lead = _leading_tokens(shape[1], wide_tokens, size, patch)
        how = "its second axis follows the image size" if changed else "its last axis holds"
        how += "" if changed else f" {shape[2]} channels"
        return Measurement(Layout(TOKENS, prefix=lead), how)
    return Measurement(None, "neither the image width nor the channel count places its axes")


# ----------------------------------------------------------------------------------------
# Both together
# ----------------------------------------------------------------------------------------

_DECLARE = (
    "(or 'channels_last', 'rows', 'tokens', 'tokens:N' for N leading class or register "
    "tokens, 'tokens:N:cls' when the first is a class token)"
)


def _cannot_tell(layer: str, shape: tuple, why: str) -> ValueError:
    return ValueError(
        f"layers: skdeep cannot tell the layout of {layer!r} (output of shape {shape}) for "
        f"this backbone: {why}; tap another layer, or say which it is with "
        f"layouts={{{layer!r}: 'channels_first'}} {_DECLARE}"
    )


def reconcile(
    layer: str,
    shape: tuple,
    stated: Layout | None,
    measured: Measurement,
    declared: bool = False,
) -> Layout:
    """Join what the model (or the user) states with what the probe measured.

    Raises
    ------
    ValueError
        They disagree, or neither can tell.
    """
    found = measured.layout
    if stated is _UNKNOWN:
        raise _cannot_tell(layer, shape, "it lies inside window or grid attention")
    if stated is None and found is None:
        raise _cannot_tell(layer, shape, measured.evidence)
    disagree = stated is not None and found is not None and stated.kind != found.kind
    if not disagree and stated is not None and found is not None and stated.kind == TOKENS:
        disagree = None not in (stated.prefix, found.prefix) and stated.prefix != found.prefix
    if disagree:
        shown = "a probe shows " + str(found) + f" ({measured.evidence})"
        if found.kind == TOKENS and found.prefix is not None and stated.kind == TOKENS:
            shown = f"a probe counts {found.prefix} leading tokens ({measured.evidence})"
        if declared:
            raise ValueError(
                f"layouts: {str(stated)!r} does not fit {layer!r} (output of shape {shape}): "
                f"{shown}; fix the declaration"
            )
        raise ValueError(
            f"layers: the layout of {layer!r} (output of shape {shape}) is uncertain: its "
            f"model family says {stated}, but {shown}; say which it is with "
            f"layouts={{{layer!r}: 'channels_first'}} {_DECLARE}"
        )
    kind = (stated or found).kind
    if kind != TOKENS:
        return Layout(kind)
    prefix = next((x.prefix for x in (stated, found) if x and x.prefix is not None), None)
    class_token = bool(stated and stated.class_token and prefix)
    return Layout(TOKENS, prefix, class_token)


def resolve_layouts(
    model: nn.Module,
    layers: list[str],
    outputs: dict[str, torch.Tensor],
    wide_outputs: dict[str, torch.Tensor] | None,
    size: int,
    pooling: str | None,
    declared: dict | None = None,
) -> dict[str, Layout]:
    """Work out the layout of each tapped layer, verified, and check that ``pooling`` applies.

    Parameters
    ----------
    model : nn.Module
        The network as built (before inference rewrites).
    layers : list of str
        Module names, ``"penultimate"`` or ``"logits"``.
    outputs, wide_outputs : dict of tensors
        Each layer's output for :data:`PROBE_IMAGES` images of ``size`` x ``size`` and
        of ``size`` x ``2 * size`` pixels (``wide_outputs`` None: refused).
    size : int
        The probe's height.
    pooling : str or None
        The pooling that will be applied.
    declared : dict, optional
        The ``layouts`` parameter, keyed by layer: trusted where the probe cannot tell,
        checked where it can.

    Raises
    ------
    ValueError
        A layout the rule and the probe disagree on, that neither can tell, that needs
        a count of leading tokens nobody knows, or that ``pooling`` does not apply to.
    """
    declared = declared or {}
    layouts = {}
    for layer in layers:
        output = outputs[layer]
        shape = tuple(output.shape)
        wide = None if wide_outputs is None else wide_outputs.get(layer)
        measured = measure_layout(
            output, wide, size, channel_count(model, layer), patch_size(model, layer)
        )
        if layer in declared:
            stated = parse_layout(declared[layer], layer)
        else:
            stated = stated_layout(model, layer)
        layout = reconcile(layer, shape, stated, measured, declared=layer in declared)
        if layout.ndim != output.ndim:
            raise ValueError(
                f"layers: {layer!r} gives an output of shape {shape}, which is not "
                f"{layout.kind} ({layout.ndim} dimensions)"
            )
        if layout.kind == TOKENS and layout.prefix is None:
            if pooling is not None:
                raise ValueError(
                    f"layers: skdeep cannot count the class and register tokens that lead "
                    f"the patch tokens of {layer!r} (output of shape {shape}); say how many "
                    f"with layouts={{{layer!r}: 'tokens:N'}} ('tokens:N:cls' when the first "
                    "is a class token)"
                )
            layout = Layout(TOKENS, 0)
        check_pooling(pooling, layout, layer)
        layouts[layer] = layout
    return layouts


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
