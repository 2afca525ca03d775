"""Device and numeric precision: resolving ``"auto"`` and entering autocast."""

from __future__ import annotations

import contextlib
import importlib.util
import re
import warnings

import torch

from ._compat import cpu_instruction_sets

PRECISIONS = ("auto", "float32", "bfloat16", "float16", "int8")
# The input size (pixels) from which "auto" trains in bfloat16 on a CPU, by the bfloat16
# instructions the CPU has (`bench_fine_tune.py --sections precision` measures it on the
# CPU at hand). Training keeps small and strided depthwise convolutions in float32 (see
# float32_depthwise_convolutions); with that, on an AMD EPYC with AVX512-BF16 alone, a
# bfloat16 step of MobileNet-V2 and -V3, EfficientNet-B0 or ResNet-18 took 0.52-1.00x
# float32's time from 64 px (up to 1.9x with plain autocast); at 32 px all tie but
# ResNet-18 (0.92x). With AMX (an Intel Xeon), measured before that change and not
# since: MobileNet-V2 took 1.29x float32's time at 64 px and 0.87x at 128. Inference
# gains from bfloat16 at every size on both kinds.
BFLOAT16_TRAINING_FROM = {"AMX": 128, "AVX512-BF16": 64}
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")


def resolve_device(device: str | torch.device) -> torch.device:
    """Turn the ``device`` parameter into a :class:`torch.device` that exists here.

    ``"auto"`` picks the first CUDA device when there is one, else the CPU.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str) or not _DEVICE_PATTERN.match(device):
        raise ValueError(
            f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device; got {device!r}"
        )
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r} was requested but CUDA is not available on this "
                "machine; use device='cpu' or device='auto'"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={device!r} was requested but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r} was requested but MPS is not available")
    return resolved


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 matrix products natively (AVX512-BF16 or AMX)."""
    instructions = cpu_instruction_sets()
    return instructions["AVX512-BF16"] or instructions["AMX"]


def bfloat16_training_size() -> int | None:
    """Return the input size from which bfloat16 trains faster on this CPU (None: never).

    Read from :data:`BFLOAT16_TRAINING_FROM` by the best bfloat16 instructions the CPU
    has; a CPU with neither computes bfloat16 by conversion and trains in float32.
    """
    instructions = cpu_instruction_sets()
    for name, size in BFLOAT16_TRAINING_FROM.items():
        if instructions[name]:
            return size
    return None


def resolve_precision(
    precision: str, device: torch.device, training_size: int | None = None
) -> torch.dtype:
    """Turn the ``precision`` parameter into the dtype the network computes in.

    ``"auto"`` means reduced precision where the hardware computes it natively:
    float16 on CUDA, bfloat16 on a CPU with AVX512-BF16 or AMX, float32 elsewhere.
    For training (``training_size``: the input size in pixels) on a CPU, bfloat16 is
    chosen only from the size where it trains faster on this kind of CPU
    (:func:`bfloat16_training_size`).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            return torch.float16
        if device.type != "cpu" or not cpu_has_native_bfloat16():
            return torch.float32
        # (a CPU with native bfloat16 has one of the instructions the sizes are read by)
        if training_size is None or training_size >= bfloat16_training_size():
            return torch.bfloat16
        return torch.float32
    if precision == "int8":
        if device.type != "cpu":
            raise ValueError(
                "precision='int8' runs on the CPU (PyTorch's x86 int8 kernels); use "
                "device='cpu', or float16 on the GPU"
            )
        if importlib.util.find_spec("torch.ao.quantization.quantize_fx") is None:
            raise ValueError(
                f"precision='int8' uses torch.ao.quantization's FX mode, which PyTorch "
                f"{torch.__version__} no longer has; use precision='float32'"
            )
        if "x86" not in torch.backends.quantized.supported_engines:
            raise ValueError(
                "precision='int8' runs on PyTorch's x86 int8 kernels, which this "
                f"machine's PyTorch lacks (it has {torch.backends.quantized.supported_engines}); "
                "use precision='float32'"
            )
        return torch.qint8
    if precision == "float16" and device.type == "cpu":
        raise ValueError(
            "precision='float16' needs a CUDA device; on the CPU use 'bfloat16' or 'float32'"
        )
    return getattr(torch, precision)


def resolve_hardware(
    device: str | torch.device, precision: str, training_size: int | None = None
) -> tuple[torch.device, torch.dtype]:
    """Resolve the ``device`` and ``precision`` parameters to a device and dtype.

    The one place where estimators resolve them (see :func:`resolve_device` and
    :func:`resolve_precision`).
    """
    resolved = resolve_device(device)
    return resolved, resolve_precision(precision, resolved, training_size)


def resolve_loaded_hardware(
    device: str | torch.device, precision: torch.dtype | None, training_size: int | None = None
) -> tuple[torch.device, torch.dtype]:
    """Resolve the device of an unpickled estimator, keeping the precision it was fitted at.

    The precision resolved where the estimator was fitted travels with it: an
    unpickled copy (a Dask worker) never resolves ``"auto"`` for itself. Where this
    machine lacks the device or cannot compute at that precision (a GPU fit loaded on
    a CPU), it falls back to the CPU and to what ``"auto"`` gives here, with a
    RuntimeWarning that names both; feature stores refuse features of another
    precision.
    """
    try:
        resolved = resolve_device(device)
    except ValueError as exc:
        warnings.warn(f"{exc}. Loaded on the CPU instead.", RuntimeWarning, stacklevel=3)
        resolved = torch.device("cpu")
    if precision is not None:
        name = "int8" if precision == torch.qint8 else str(precision).removeprefix("torch.")
        try:
            return resolved, resolve_precision(name, resolved, training_size)
        except ValueError as exc:
            fallback = resolve_precision("auto", resolved, training_size)
            warnings.warn(
                f"this estimator was fitted to compute in {name}, which {resolved.type} "
                f"cannot here ({exc}); it computes in {str(fallback).removeprefix('torch.')} "
                "instead, so its outputs differ slightly from the original's",
                RuntimeWarning,
                stacklevel=3,
            )
            return resolved, fallback
    return resolved, resolve_precision("auto", resolved, training_size)


def input_dtype(precision: torch.dtype) -> torch.dtype:
    """Return the dtype of network input at ``precision`` (int8 networks take float32)."""
    return torch.float32 if precision == torch.qint8 else precision


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Enter the mixed-precision context of ``dtype``; a no-op for float32 and int8."""
    if dtype in (torch.float32, torch.qint8):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# A depthwise convolution computes in float32 while training in bfloat16 on a CPU when
# it is strided or its input map has at most this many pixels (14x14): there oneDNN's
# bfloat16 backward is slowest (see float32_depthwise_convolutions), while over larger
# maps bfloat16 is the faster of the two.
FLOAT32_DEPTHWISE_MAX_PIXELS = 196


class _DepthwiseConv2d(torch.nn.Conv2d):
    """A depthwise ``Conv2d`` that picks float32 inside autocast where bfloat16 is slow."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        height, width = input.shape[-2:]
        if max(self.stride) > 1 or height * width <= FLOAT32_DEPTHWISE_MAX_PIXELS:
            with torch.autocast("cpu", enabled=False):
                return super().forward(input.float())
        return super().forward(input)


def is_depthwise(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a plain ``Conv2d`` with one group per input channel."""
    return type(module) is torch.nn.Conv2d and 1 < module.groups == module.in_channels


@contextlib.contextmanager
def float32_depthwise_convolutions(model: torch.nn.Module, device: torch.device, dtype):
    """Inside the block, train the small and strided depthwise convolutions in float32.

    Applies to bfloat16 training on a CPU only. There, oneDNN's bfloat16 backward of a
    depthwise convolution over a small map, or with a stride, is slow enough (on an AMD
    EPYC with AVX512-BF16, a third of a MobileNet-V3 step, whose bfloat16 step took 1.7x
    float32's) to make bfloat16 lose to float32; in float32 they cost little, and the
    dense convolutions, most of the work, keep bfloat16 (see
    :data:`FLOAT32_DEPTHWISE_MAX_PIXELS`). Each trainable depthwise ``nn.Conv2d`` takes
    a subclass for the block (same parameters, names and state dict) and gets its class
    back after it, whatever happens; frozen ones keep bfloat16, whose backward to the
    input is fast.
    """
    if device.type != "cpu" or dtype != torch.bfloat16:
        yield
        return
    swapped = [m for m in model.modules() if is_depthwise(m) and m.weight.requires_grad]
    for module in swapped:
        module.__class__ = _DepthwiseConv2d
    try:
        yield
    finally:
        for module in swapped:
            module.__class__ = torch.nn.Conv2d


def fork_rng(device: torch.device, seed: int | None) -> contextlib.AbstractContextManager:
    """Seed torch's global generators inside the block and restore them after it.

    Head initialisation and dropout draw from the global generators; forking keeps a
    fitted estimator reproducible without changing the caller's random state.
    """
    if seed is None:
        return contextlib.nullcontext()
    # An empty list forks the CPU generator only.
    devices = [device.index or torch.cuda.current_device()] if device.type == "cuda" else []

    @contextlib.contextmanager
    def seeded():
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    return seeded()
