"""What every skdeep estimator shares: backbone parameters, devices, batches, pickling."""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Iterator
from numbers import Integral

import numpy as np
import torch
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from torch import nn

from ._device import PRECISIONS, autocast, resolve_device, resolve_precision
from ._images import ImageSource, as_image_source
from ._preprocess import prepare_batch
from ._progress import Progress

BACKBONE_CONSTRAINTS = {
    "backbone": [str, nn.Module],
    "weights": [str, os.PathLike, None],
    "image_size": [Interval(Integral, 1, None, closed="left"), None],
    "image_shape": [tuple, list, None],
    "value_range": [tuple, list, None],
    "batch_size": [Interval(Integral, 1, None, closed="left")],
    "device": [str, torch.device],
    "precision": [StrOptions(set(PRECISIONS))],
    "num_workers": [Interval(Integral, 0, None, closed="left")],
    "random_state": ["random_state"],
    "verbose": ["verbose"],
}


class BackboneMixin:
    """Helpers for estimators that run a torchvision backbone on images.

    Expects the parameters of :data:`BACKBONE_CONSTRAINTS` and, once fitted,
    ``model_``, ``device_``, ``precision_`` and ``preprocessing_``.
    """

    def _check_value_range(self) -> None:
        value_range = self.value_range
        if value_range is None:
            return
        if len(value_range) != 2 or not float(value_range[0]) < float(value_range[1]):
            raise ValueError(
                f"value_range must be (low, high) with low < high; got {value_range!r}"
            )

    def _image_source(self, X) -> ImageSource:
        self._check_value_range()
        return as_image_source(X, image_shape=self.image_shape, value_range=self.value_range)

    def _resolve_hardware(self) -> None:
        self.device_ = resolve_device(self.device)
        self.precision_ = self._resolve_precision(self.precision)

    def _resolve_precision(self, precision: str) -> torch.dtype:
        return resolve_precision(precision, self.device_)

    def _torch_seed(self) -> int | None:
        """An int seed for torch from ``random_state`` (None stays None)."""
        if self.random_state is None:
            return None
        return int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))

    def _input_batches(
        self,
        source: ImageSource,
        indices=None,
        dtype: torch.dtype = torch.float32,
    ) -> Iterator[torch.Tensor]:
        """Network-ready batches (normalized, channels_last, on ``device_``)."""
        raw_batches = source.batches(
            self.batch_size,
            self.preprocessing_,
            indices=indices,
            num_workers=self.num_workers,
            pin_memory=self.device_.type == "cuda",
        )
        for raw in raw_batches:
            yield prepare_batch(
                raw, self.preprocessing_, self.device_, source.value_range, dtype, source.resized
            )

    def _collect(
        self,
        source: ImageSource,
        forward,
        width: int,
        indices=None,
        show_progress: bool = True,
    ) -> np.ndarray:
        """Run ``forward`` (network-ready batch -> rows) over the images at ``indices``
        (all: None) in inference mode and gather the rows in a float32 array."""
        n = len(source) if indices is None else len(indices)
        out = np.empty((n, width), dtype=np.float32)
        start = 0
        enabled = bool(self.verbose) and show_progress
        progress = Progress(n, type(self).__name__, enabled=enabled)
        with progress, torch.inference_mode():
            for batch in self._input_batches(source, indices, dtype=self.precision_):
                with autocast(self.device_, self.precision_):
                    rows = forward(batch).float()
                if not torch.isfinite(rows).all():
                    raise FloatingPointError(
                        f"the network produced NaN or infinite values at precision "
                        f"{self.precision_}; use precision='float32'"
                    )
                out[start : start + len(rows)] = rows.cpu().numpy()
                start += len(rows)
                progress.update(len(rows))
        return out

    # --- pickling: CPU state only, loadable without a GPU --------------------------------

    def _model_to_pickle(self) -> nn.Module | None:
        """The ``model_`` to store in a pickle (None: rebuilt from parameters on load)."""
        return _on_cpu(self.model_)

    def _rebuild_model(self) -> nn.Module:
        raise NotImplementedError

    def __getstate__(self):
        state = super().__getstate__()
        if "model_" in state:
            state = dict(state)
            state["model_"] = self._model_to_pickle()
            # Devices are resolved again where the pickle is loaded.
            state.pop("device_", None)
            state.pop("precision_", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if "model_" not in state:
            return
        try:
            self.device_ = resolve_device(self.device)
        except ValueError as exc:
            warnings.warn(f"{exc}. Loaded on the CPU instead.", RuntimeWarning, stacklevel=2)
            self.device_ = torch.device("cpu")
        try:
            self.precision_ = self._resolve_precision(self.precision)
        except ValueError:  # float16 asked for, but now on the CPU
            self.precision_ = self._resolve_precision("auto")
        model = self.model_ if self.model_ is not None else self._rebuild_model()
        self.model_ = model.to(self.device_)


def _on_cpu(module: nn.Module) -> nn.Module:
    """``module`` itself if it lives on the CPU, else a CPU copy of it."""
    tensors = [*module.parameters(), *module.buffers()]
    if all(tensor.device.type == "cpu" for tensor in tensors):
        return module
    return copy.deepcopy(module).cpu()
