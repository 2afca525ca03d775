"""The identity of features: would these settings, on these inputs, give these rows.

One function, :func:`feature_identity`, answers for an extractor: everything that shapes
a feature row, from the network's architecture and weights to the precision it runs
at. The per-image cache keys its rows by its digest, and a feature store records it and
refuses to resume under another, so the two can never disagree on what counts as "the
same features". :func:`input_identity` does the same for what goes in: the image files
(by location, size and modification time), a ``.npy`` file, and the labels.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
from dataclasses import asdict

import torch
from torch import nn

from ._version import __version__
from ._weights import digest_value, state_digest

# Attribute types that describe how a module computes (strides, eps, flags, ...).
_SETTING_TYPES = (bool, int, float, str, type(None))


def architecture_digest(module: nn.Module) -> str:
    """Digest how a network computes, apart from its trained weights.

    Every module's name, class and plain settings (the attributes that hold numbers,
    strings, flags or tuples of them: strides, ``eps``, ``transform_input``, ...); the
    code of its class (:func:`code_digest`: ``forward`` and every other method, of the
    user's own classes too) and of any ``forward`` set on the instance or hook
    registered on it; the shapes of its buffers and the values of those that are not
    persistent (not in the ``state_dict``: position indices, masks). Two networks with
    equal weights but another stride, flag, ``forward`` or non-persistent buffer get
    different digests.
    """
    digest = hashlib.blake2b(digest_size=16)
    for name, child in module.named_modules():
        kind = type(child)
        digest.update(f"{name}|{kind.__module__}.{kind.__qualname__}|".encode())
        digest.update(code_digest(kind).encode())
        for key, value in sorted(vars(child).items()):
            if key == "forward" and callable(value):  # a forward set on the instance
                digest.update(f"forward={_callable_digest(value)};".encode())
            if key.startswith("_") or key == "training":
                continue
            if isinstance(value, _SETTING_TYPES) or (
                isinstance(value, (tuple, list))
                and all(isinstance(v, _SETTING_TYPES) for v in value)
            ):
                digest.update(f"{key}={value!r};".encode())
        for hooks in ("_forward_pre_hooks", "_forward_hooks"):
            for hook in getattr(child, hooks, {}).values():
                digest.update(f"{hooks}={_callable_digest(hook)};".encode())
        transient = getattr(child, "_non_persistent_buffers_set", set())
        for key, buffer in child.named_buffers(recurse=False):
            digest.update(f"{key}:{buffer.dtype}{tuple(buffer.shape)};".encode())
            if key in transient:
                digest_value(digest, buffer)
    return digest.hexdigest()


@functools.lru_cache(maxsize=1024)
def code_digest(kind: type) -> str:
    """Digest the code of a module class: every function it or its bases define.

    PyTorch's own classes are left out (the torch version stands for them). Each
    function counts by its source where Python can find it, else by its bytecode
    (classes defined in a notebook or with ``exec``).
    """
    digest = hashlib.blake2b(digest_size=16)
    for klass in kind.__mro__:
        if klass is object or klass.__module__.split(".")[0] == "torch":
            continue
        digest.update(f"{klass.__module__}.{klass.__qualname__}:".encode())
        for key, value in sorted(vars(klass).items()):
            function = getattr(value, "__func__", value)  # staticmethod, classmethod
            if isinstance(value, property):
                function = value.fget
            if inspect.isfunction(function):
                digest.update(f"{key}={_callable_digest(function)};".encode())
    return digest.hexdigest()


def _callable_digest(function) -> str:
    """Digest a function (or bound method, partial) by its source, else its bytecode."""
    function = getattr(function, "__func__", function)
    if isinstance(function, functools.partial):
        return _callable_digest(function.func) + repr((function.args, function.keywords))
    code = getattr(function, "__code__", None)
    if code is None:  # a callable object: its class's code
        kind = type(function)
        return f"{kind.__module__}.{kind.__qualname__}" + (
            code_digest(kind) if isinstance(function, nn.Module) else _class_source(kind)
        )
    try:
        text = inspect.getsource(function)
    except Exception:  # no source file (a notebook, exec), or one inspect cannot parse
        text = _bytecode(code)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _class_source(kind: type) -> str:
    try:
        return inspect.getsource(kind)
    except Exception:  # as in _callable_digest
        return "".join(
            _bytecode(value.__code__) for value in vars(kind).values() if inspect.isfunction(value)
        )


def _bytecode(code) -> str:
    """Text of a code object: its instructions, constants (nested code too) and names."""
    constants = [
        _bytecode(constant) if inspect.iscode(constant) else repr(constant)
        for constant in code.co_consts
    ]
    return f"{code.co_code.hex()}|{constants}|{code.co_names}|{code.co_varnames}"


def feature_identity(extractor) -> dict:
    """Everything that shapes the feature rows of a fitted ``FeatureExtractor``.

    Returns a JSON-compatible dict: the versions of skdeep and torch, the digests of
    the network's architecture and weights (as fitted), the tapped layers (module
    names) and their layouts, the pooling, the preprocessing (geometry, interpolation,
    mean and std), how pixels are read (``value_range``, ``image_shape``), the batch
    size, the device type and precision as resolved, and the digest of the int8
    calibration (None when not quantized).
    """
    check_fitted = getattr(extractor, "_check_fitted", None)
    if check_fitted is not None:  # no parameter set since fit
        check_fitted()
    calibration = getattr(extractor, "_int8_calibration", None)
    identity = {
        "skdeep": __version__,
        "torch": torch.__version__,
        "architecture": extractor.architecture_digest_,
        "weights": extractor.weights_digest_,
        "layers": list(extractor.layers_),
        "layouts": dict(extractor.layouts_),
        "pooling": extractor.pooling,
        "preprocessing": asdict(extractor.preprocessing_),
        "value_range": _numbers(extractor.value_range),
        "image_shape": _numbers(extractor.image_shape),
        "batch_size": int(extractor.batch_size),
        "device": extractor.device_.type,
        "precision": str(extractor.precision_).removeprefix("torch."),
        "calibration": None if calibration is None else state_digest(calibration),
    }
    return json.loads(json.dumps(identity))  # tuples become lists, as stored


def input_identity(paths: list[str] | None = None, npy: str | None = None, labels=None) -> dict:
    """Identify the images and labels a store is made from.

    Image files by absolute path, size and modification time (reading every file to
    hash it would cost as much as decoding it); a ``.npy`` file the same way; labels by
    their text.
    """
    identity = {"files": None, "npy": None, "labels": None}
    if paths is not None:
        identity["files"] = _digest(file_fingerprint(path) for path in paths)
    if npy is not None:
        identity["npy"] = file_fingerprint(npy).hex()
    if labels is not None:
        identity["labels"] = _digest(str(label).encode() for label in labels)
    return identity


def file_fingerprint(path: str | os.PathLike) -> bytes:
    """Digest a file's absolute path, modification time and size."""
    stat = os.stat(path)
    text = f"{os.path.abspath(path)}|{stat.st_mtime_ns}|{stat.st_size}"
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def identity_digest(identity: dict) -> str:
    """Digest an identity dict (the per-image cache's key for a setting)."""
    text = json.dumps(identity, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def differences(stored: dict, current: dict) -> list[str]:
    """Name the entries where two identities differ: ``"key: stored -> current"``."""
    return [
        f"{key}={stored.get(key)!r}, not {current.get(key)!r}"
        for key in sorted(set(stored) | set(current))
        if stored.get(key) != current.get(key)
    ]


def _numbers(value):
    return None if value is None else [float(v) if isinstance(v, float) else v for v in value]


def _digest(parts) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(part + b"\0")
    return digest.hexdigest()
