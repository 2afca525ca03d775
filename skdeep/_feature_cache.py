"""An on-disk cache of features, image by image.

A ``Pipeline``'s own ``memory`` caches whole ``fit_transform`` calls, keyed by the whole
``X``, so every cross-validation fold (a different subset of rows) misses it. This cache
is keyed by each image's fingerprint instead: once an image has gone through the
backbone with some settings, no later call with those settings computes it again.

Layout: ``<location>/skdeep_features/<settings key>/<uuid>.npz``; each shard holds the
fingerprints and feature rows computed by one ``transform`` call. Shards are written
atomically, so processes of a parallel grid search can share one folder.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np


class FeatureCache:
    """Feature rows of one extractor setting, stored under ``location``."""

    def __init__(self, location: str | os.PathLike, settings_key: str):
        self.folder = Path(location) / "skdeep_features" / settings_key

    def lookup(self, fingerprints: list[bytes], n_features: int) -> tuple[np.ndarray, np.ndarray]:
        """Look up rows; return ``(features, missing)``.

        ``features`` holds the rows found in the cache; ``missing`` the indices of the
        rows that are not (their feature rows are left uninitialised).
        """
        wanted = {key: row for row, key in enumerate(fingerprints)}
        features = np.empty((len(fingerprints), n_features), dtype=np.float32)
        found = np.zeros(len(fingerprints), dtype=bool)
        for shard in sorted(self.folder.glob("*.npz")) if self.folder.is_dir() else ():
            with np.load(shard) as data:
                keys = [bytes(key) for key in data["keys"]]
                hits = [(row, wanted[key]) for row, key in enumerate(keys) if key in wanted]
                if hits:
                    shard_rows, rows = map(list, zip(*hits, strict=True))
                    features[rows] = data["features"][shard_rows]
                    found[rows] = True
        # Duplicated images in X share a fingerprint: fill every copy.
        if len(wanted) < len(fingerprints):
            for row, key in enumerate(fingerprints):
                if not found[row] and found[wanted[key]]:
                    features[row] = features[wanted[key]]
                    found[row] = True
        return features, np.flatnonzero(~found)

    def store(self, fingerprints: list[bytes], features: np.ndarray) -> None:
        """Add rows to the cache (one new shard file)."""
        if not len(fingerprints):
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        name = uuid.uuid4().hex
        temporary = self.folder / f"{name}.partial"
        keys = np.frombuffer(b"".join(fingerprints), dtype=np.uint8).reshape(len(fingerprints), -1)
        with open(temporary, "wb") as file:
            np.savez(file, keys=keys, features=features.astype(np.float32, copy=False))
        os.replace(temporary, self.folder / f"{name}.npz")
