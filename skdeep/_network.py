"""Surgery on a built network: its head, its stages, its layer names and input size.

No weights are loaded here (see :mod:`skdeep._weights`) and no registry is consulted
(see :mod:`skdeep.backbones`): these functions take a module as it is.
"""

from __future__ import annotations

import difflib
import math

import torch
from torch import nn

from . import _timm
from ._compat import BatchNorm

PENULTIMATE = "penultimate"
"""Layer name of the features the classifier head receives (its input)."""
LOGITS = "logits"
"""Layer name of the network's output (the class scores)."""


def head_names(module: nn.Module) -> list[str]:
    """Name the classifier head(s): the modules whose input ``"penultimate"`` is.

    A timm model's are those its ``pretrained_cfg`` names (two for distilled models:
    ``head`` and ``head_dist``, whose inputs' mean is timm's pre-logits); any other
    network's is its last ``nn.Linear`` (or else ``nn.Conv2d``). FeatureExtractor's
    ``"penultimate"`` and FineTuneClassifier's new head follow this one rule.
    """
    names = _timm.classifier_names(module)
    if names is not None:
        return names
    return [_last_linear(module)[0]]


def find_head(module: nn.Module) -> tuple[str, nn.Module]:
    """Find the (first) classifier head of :func:`head_names`: its name and module."""
    name = head_names(module)[0]
    return name, module.get_submodule(name)


def holds_head(module: nn.Module, name: str) -> bool:
    """Whether the module called ``name`` is, or holds, a classifier head."""
    return any(head == name or head.startswith(name + ".") for head in head_names(module))


def _last_linear(module: nn.Module) -> tuple[str, nn.Module]:
    """Return the last ``nn.Linear`` (or else ``nn.Conv2d``) of ``module``."""
    for kind in (nn.Linear, nn.Conv2d):
        heads = [(name, child) for name, child in module.named_modules() if isinstance(child, kind)]
        if heads:
            return heads[-1]
    raise ValueError(
        f"backbone {type(module).__name__} has no nn.Linear or nn.Conv2d layer to use as "
        "the classifier head"
    )


def replace_head(module: nn.Module, n_outputs: int) -> str:
    """Swap the classifier head for a fresh one with ``n_outputs`` outputs; return its name.

    timm models get theirs from timm's own ``reset_classifier``.
    """
    timm_head = _timm.replace_head(module, n_outputs)
    if timm_head is not None:
        return timm_head
    name, head = _last_linear(module)
    if isinstance(head, nn.Linear):
        new_head = nn.Linear(head.in_features, n_outputs)
    else:
        new_head = nn.Conv2d(head.in_channels, n_outputs, head.kernel_size, head.stride)
    set_submodule(module, name, new_head)
    return name


def drop_auxiliary_heads(module: nn.Module) -> list[str]:
    """Remove the auxiliary classifiers that torchvision's Inception v3 and GoogLeNet train.

    With them, these networks return a named tuple of outputs in training mode. skdeep
    fine-tunes the new head alone, as these networks are usually fine-tuned, and the
    network then returns its logits in every mode. Returns the names removed.
    """
    from torchvision.models import GoogLeNet, Inception3

    if isinstance(module, Inception3):
        names = ["AuxLogits"]
    elif isinstance(module, GoogLeNet):
        names = ["aux1", "aux2"]
    else:
        return []
    module.aux_logits = False
    for name in names:
        setattr(module, name, None)
    return names


def reset_parameters(module: nn.Module, argument: str = "weights") -> None:
    """Initialise every parameter of ``module`` at random, in place, as its layers do.

    Each submodule's own ``reset_parameters`` (``_reset_parameters`` for attention)
    draws from torch's random generator, so seed it first to repeat a draw. Batch norms
    also forget their running statistics.

    Raises
    ------
    ValueError
        Some parameters belong to modules that have no such method (a bare
        ``nn.Parameter`` such as a class token): they would keep their values, so the
        network would be half random; the error names them.
    """
    reset = set()
    for child in module.modules():
        method = getattr(child, "reset_parameters", None) or getattr(
            child, "_reset_parameters", None
        )
        if callable(method):
            method()
            reset |= {id(parameter) for parameter in child.parameters(recurse=False)}
    left = [name for name, parameter in module.named_parameters() if id(parameter) not in reset]
    if left:
        shown = ", ".join(map(repr, left[:5])) + (
            f" and {len(left) - 5} more" if len(left) > 5 else ""
        )
        raise ValueError(
            f"{argument}=None asks for random weights, but the parameters {shown} of this "
            f"{type(module).__name__} belong to modules without reset_parameters, so they "
            "cannot be drawn again; pass a weights name such as weights='DEFAULT' to keep "
            "the module's own parameters (set them yourself first for random ones)"
        )


def backbone_stages(module: nn.Module) -> list[str]:
    """List the backbone's blocks in forward order: what ``freeze=N`` counts.

    These are the top-level children that hold parameters, with each top-level
    ``nn.Sequential`` (such as torchvision's ``features``) counted by its children.
    The classifier head is never a stage; the other layers of its container (VGG's
    fully connected layers, say) are.
    """
    stages = []
    for name, child in module.named_children():
        if holds_head(module, name) or (isinstance(child, nn.Sequential) and len(child) > 1):
            parts = [(f"{name}.{sub}", grandchild) for sub, grandchild in child.named_children()]
        else:
            parts = [(name, child)]
        for part_name, part in parts:
            if not holds_head(module, part_name) and any(True for _ in part.parameters()):
                stages.append(part_name)
    return stages


def set_submodule(module: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule called ``name``."""
    parent_name, _, child_name = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    setattr(parent, child_name, new)


def check_input_size(module: nn.Module, size: int, device: torch.device) -> None:
    """Check that the network (float32 weights) takes ``size`` x ``size`` images.

    Raises a ValueError naming ``image_size`` and the smallest size that works when
    it does not (too many poolings, say).
    """
    error = _forward_error(module, size, device)
    if error is None:
        return
    larger = [candidate for candidate in (2**k for k in range(1, 12)) if candidate > size]
    working = next((c for c in larger if _forward_error(module, c, device) is None), None)
    if working is None:  # not a question of size
        raise error
    low, high = size, working  # low fails, high works: bisect
    while high - low > 1:
        middle = (low + high) // 2
        if _forward_error(module, middle, device) is None:
            high = middle
        else:
            low = middle
    raise ValueError(
        f"image_size: the network input of {size}x{size} pixels is too small for this "
        f"backbone (the smallest size that works is {high}); pass image_size={high} or more"
    ) from error


def single_values_per_channel(
    module: nn.Module,
    norms: list[nn.Module],
    frozen: list[nn.Module],
    size: int,
    device: torch.device,
) -> list[str]:
    """Name the ``norms`` that see one value per channel of each image of ``size`` px.

    A batch norm that trains needs two values per channel: a 2-D batch norm over maps
    larger than 1x1 trains on one image, one after global pooling (1x1 maps, or a 1-D
    batch norm over rows) does not. One forward pass of two blank images in training
    mode (``frozen`` modules in eval mode, as they train), which reaches layers that
    run only while training (auxiliary heads), finds out; it changes no running
    statistic.
    """
    wanted = {id(norm) for norm in norms}
    names = {id(m): name for name, m in module.named_modules() if id(m) in wanted}
    single: list[str] = []

    def note(norm, inputs, output):
        if math.prod(inputs[0].shape[2:]) == 1:
            single.append(names[id(norm)])

    every_norm = [m for m in module.modules() if isinstance(m, BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.track_running_stats else None)
             for m in every_norm]  # fmt: skip
    handles = [norm.register_forward_hook(note) for norm in norms]
    was_training = module.training
    module.train()
    for part in frozen:
        part.eval()
    try:
        for norm in every_norm:
            norm.momentum = 0.0  # running statistics stay as they are
        # Dropout draws here must not move the caller's random generators.
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            module(torch.zeros(2, 3, size, size, device=device))
    finally:
        for norm, (momentum, tracked) in zip(every_norm, saved, strict=True):
            norm.momentum = momentum
            if tracked is not None:
                norm.num_batches_tracked.copy_(tracked)
        module.train(was_training)
        for handle in handles:
            handle.remove()
    return sorted(set(single), key=single.index)


def _forward_error(module: nn.Module, size: int, device: torch.device) -> RuntimeError | None:
    """Return the error of one forward pass of two blank images, if any."""
    was_training = module.training
    module.eval()
    try:
        with torch.inference_mode():
            module(torch.zeros(2, 3, size, size, device=device))
    except RuntimeError as exc:
        return exc
    finally:
        module.train(was_training)
    return None


def resolve_layer_names(
    module: nn.Module, layers: list[str], argument: str = "layers", read_by_timm: bool = False
) -> list[str]:
    """Check the layers to tap, with timm's ``"intermediate:N"`` replaced by module names.

    With ``read_by_timm``, an intermediate whose module the model lacks becomes
    ``"intermediate:K"`` (K from 0), read through timm's ``forward_intermediates``
    (see :func:`skdeep._timm.intermediate_module`).

    Raises
    ------
    ValueError
        An unknown module name, a bad intermediate index, or two names for one module.
    """
    resolved = [
        _timm.intermediate_module(module, layer, argument, read_by_timm)
        if layer.startswith(_timm.INTERMEDIATE)
        else layer
        for layer in layers
    ]
    if len(set(resolved)) < len(resolved):
        raise ValueError(f"{argument}: {layers!r} name one module twice (they are {resolved!r})")
    check_layer_names(module, [n for n in resolved if _timm.read_by_timm(n) is None], argument)
    return resolved


def check_layer_names(module: nn.Module, layers: list[str], argument: str = "layers") -> None:
    """Raise a ValueError listing close matches for any unknown module name."""
    names = [name for name, _ in module.named_modules() if name]
    known = set(names)
    special = [PENULTIMATE, LOGITS]
    if isinstance(getattr(module, "feature_info", None), list):  # a timm model
        special.append(_timm.INTERMEDIATE + "N")
    for layer in layers:
        if layer not in (PENULTIMATE, LOGITS) and layer not in known:
            close = difflib.get_close_matches(layer, names, n=5, cutoff=0.6)
            hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
            raise ValueError(
                f"{argument}: {layer!r} is not a module of the backbone; {hint}"
                f"valid names are {', '.join(map(repr, special))} and module names such "
                f"as {', '.join(map(repr, names[:3]))} ... "
                f"{', '.join(map(repr, names[-3:]))} (see dict(model.named_modules()))"
            )
