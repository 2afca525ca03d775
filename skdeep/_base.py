"""What every skdeep estimator shares.

Backbone parameters, devices, pooled features, pickling, and the per-process store
of networks rebuilt after unpickling.
"""

from __future__ import annotations

import copy
import os
import threading
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterator
from numbers import Integral

import numpy as np
import torch
from sklearn.utils import check_random_state
from torch import nn

from ._compat import Interval, StrOptions
from ._device import PRECISIONS, autocast, input_dtype, resolve_hardware, resolve_loaded_hardware
from ._feed import RowCollector, device_batches
from ._images import ImageSource, as_image_source
from ._preprocess import prepare_images
from ._progress import progress_bar
from ._taps import LayerFeatures

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
    ``device_``, ``precision_`` and ``preprocessing_``.
    """

    # Private attributes derived from the fitted state (networks, keys): never
    # pickled, set to None on loading and rebuilt when first needed.
    _derived_state: tuple[str, ...] = ()

    def _check_value_range(self) -> None:
        value_range = self.value_range
        if value_range is None:
            return
        try:
            low, high = (float(value) for value in value_range)
        except (TypeError, ValueError):
            low = high = np.nan
        if not (np.isfinite(low) and np.isfinite(high) and low < high):
            raise ValueError(
                "value_range must be (low, high), two finite numbers with low < high; "
                f"got {value_range!r}"
            )

    def _image_source(self, X, argument: str = "X") -> ImageSource:
        self._check_value_range()
        return as_image_source(
            X, image_shape=self.image_shape, value_range=self.value_range, argument=argument
        )

    def _training_size(self) -> int | None:
        """Input size the network trains at (None: it does not train)."""
        return None

    def _resolve_hardware(self) -> None:
        """Set ``device_`` and ``precision_`` from the parameters."""
        self.device_, self.precision_ = resolve_hardware(
            self.device, self.precision, self._training_size()
        )

    def _torch_seed(self) -> int | None:
        """Draw an int seed for torch from ``random_state`` (None stays None)."""
        if self.random_state is None:
            return None
        return int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))

    def _input_batches(
        self,
        source: ImageSource,
        indices=None,
        dtype: torch.dtype = torch.float32,
        batch_size: int | None = None,
    ) -> Iterator[torch.Tensor]:
        """Network-ready batches (normalized, channels_last, on ``device_``).

        Of ``batch_size`` images (default: the ``batch_size`` parameter), read ahead
        of the network (see :mod:`skdeep._feed`).
        """
        raw_batches = source.batches(
            batch_size or self.batch_size,
            self.preprocessing_,
            indices=indices,
            num_workers=self.num_workers,
        )
        prep, device = self.preprocessing_, self.device_
        yield from device_batches(
            raw_batches, lambda raw: prepare_images(raw, prep, device, dtype), device
        )

    def _pooled_features(
        self,
        source: ImageSource,
        module: nn.Module,
        layers: list[str],
        pooling: str | None = "avg",
        indices=None,
        stop_after: str | None = None,
        show_progress: bool = True,
        layouts: dict | None = None,
    ) -> np.ndarray:
        """Compute pooled features of ``layers`` of ``module`` as float32 rows.

        How every estimator reads its network, for the images at ``indices`` (all: None).

        Runs in inference mode at ``precision_``; ``module`` must be in eval mode.

        Raises
        ------
        FloatingPointError
            The network produced NaN or infinite values.
        """
        n = len(source) if indices is None else len(indices)
        rows_out = RowCollector(
            n,
            self.device_,
            lambda: FloatingPointError(
                f"the network produced NaN or infinite values at precision "
                f"{self.precision_}; use precision='float32'"
            ),
        )
        enabled = bool(self.verbose) and show_progress
        progress = progress_bar(n, type(self).__name__, enabled=enabled)
        with (
            progress,
            network_lock(module),
            LayerFeatures(module, layers, pooling, stop_after, layouts) as features,
            torch.inference_mode(),
        ):
            for batch in self._input_batches(source, indices, dtype=input_dtype(self.precision_)):
                with autocast(self.device_, self.precision_):
                    rows = features(batch).float()
                rows_out.add(rows)
                progress.update(len(rows))
            return rows_out.finish()

    # --- pickling: CPU state only, loadable without a GPU --------------------------------

    def __getstate__(self):
        state = dict(super().__getstate__())
        # The device is resolved where the pickle is loaded; the precision travels, so
        # that a copy (a Dask worker) computes at the precision of the original.
        for key in ("device_", *self._derived_state):
            state.pop(key, None)
        if isinstance(state.get("model_"), nn.Module):
            state["model_"] = _on_cpu(state["model_"])
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        for key in self._derived_state:
            setattr(self, key, None)
        if "preprocessing_" in state:  # fitted
            self.device_, self.precision_ = resolve_loaded_hardware(
                self.device, state.get("precision_"), self._training_size()
            )
            if isinstance(state.get("model_"), nn.Module):
                self.model_ = self.model_.to(self.device_)


def _on_cpu(module: nn.Module) -> nn.Module:
    """Return ``module`` itself if it lives on the CPU, else a CPU copy of it."""
    tensors = [*module.parameters(), *module.buffers()]
    if all(tensor.device.type == "cpu" for tensor in tensors):
        return module
    return copy.deepcopy(module).cpu()


# ----------------------------------------------------------------------------------------
# Networks shared within a process
# ----------------------------------------------------------------------------------------

# How many networks rebuilt from unpickled estimators one process keeps.
MAX_SHARED_NETWORKS = 4
_shared_networks: OrderedDict[Hashable, nn.Module] = OrderedDict()
_shared_networks_lock = threading.Lock()
NETWORK_BUILDS: Counter = Counter()
"""How many networks this process has built, by key (what the Dask tests count)."""

_locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_locks_lock = threading.Lock()


def shared_network(key: Hashable, build: Callable[[], nn.Module]) -> nn.Module:
    """Return the network stored under ``key`` in this process, built on first use.

    Every copy of a fitted estimator that is unpickled in a process (each Dask task
    may receive its own copy) finds the same network here, so a worker process builds
    it once and reuses it for all its tasks. The least recently used networks are
    dropped beyond :data:`MAX_SHARED_NETWORKS`.
    """
    with _shared_networks_lock:
        if key in _shared_networks:
            _shared_networks.move_to_end(key)
            return _shared_networks[key]
        network = build()
        NETWORK_BUILDS[key] += 1
        _shared_networks[key] = network
        while len(_shared_networks) > MAX_SHARED_NETWORKS:
            _shared_networks.popitem(last=False)
        return network


def network_lock(module: nn.Module) -> threading.RLock:
    """Return the lock that guards forward passes with hooks on ``module``.

    Layer taps register hooks on the module itself, so two threads reading the same
    network at once (a threaded Dask worker, a joblib thread pool) would record each
    other's outputs; they take turns instead.
    """
    with _locks_lock:
        lock = _locks.get(module)
        if lock is None:
            lock = _locks[module] = threading.RLock()
        return lock
