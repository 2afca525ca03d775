"""The one place that touches private names of scikit-learn and PyTorch.

Each name below is used by skdeep but not part of its library's public API, so a
release may move or rename it. Keeping them here means a breaking release is fixed in
one file.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
from sklearn.base import _fit_context
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "BatchNorm",
    "HasMethods",
    "Interval",
    "StrOptions",
    "conv_forward",
    "convolution_pointwise",
    "cpu_instruction_sets",
    "fit_context",
    "optional_import",
]

BatchNorm = _BatchNorm
"""The base class of BatchNorm1d/2d/3d and SyncBatchNorm (the modules with running
statistics)."""


def fit_context(estimator_fit):
    """Decorate ``fit``: validate the parameters once, skip nested validation."""
    return _fit_context(prefer_skip_nested_validation=True)(estimator_fit)


def conv_forward(layer, x, weight, bias):
    """Run a convolution layer's own computation (its padding mode) with other weights."""
    return layer._conv_forward(x, weight, bias)


def convolution_pointwise(x, weight, bias, padding, stride, dilation, groups, activation, scalars):
    """OneDNN's convolution followed by an activation in one call (CPU builds only)."""
    return torch.ops.mkldnn._convolution_pointwise(
        x, weight, bias, padding, stride, dilation, groups, activation, scalars, ""
    )


# Instruction-set checks of torch.cpu, by the name skdeep reports them under.
_CPU_CHECKS = {
    "AVX2": "_is_avx2_supported",
    "AVX512": "_is_avx512_supported",
    "VNNI": "_is_vnni_supported",
    "AVX512-BF16": "_is_avx512_bf16_supported",
    "AMX": "_is_amx_tile_supported",
}


def cpu_instruction_sets() -> dict[str, bool]:
    """Tell which of AVX2, AVX512, VNNI, AVX512-BF16 and AMX this CPU has.

    False where the installed torch cannot tell.
    """
    return {
        name: bool(getattr(torch.cpu, check, lambda: False)())
        for name, check in _CPU_CHECKS.items()
    }


def optional_import(module: str, purpose: str, extra: str) -> ModuleType:
    """Import an optional dependency, or raise an ImportError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f'{purpose} need {module}: pip install "skdeep[{extra}]" (or pip install {module})'
        ) from exc
