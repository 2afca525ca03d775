"""An on-disk cache of features, image by image, in one SQLite database.

A ``Pipeline``'s own ``memory`` caches whole ``fit_transform`` calls, keyed by the whole
``X``, so every cross-validation fold (a different subset of rows) misses it. This cache
is keyed by each image's fingerprint instead: once an image has gone through the
backbone with some settings, no later call with those settings computes it again.

The database ``<location>/skdeep_features.sqlite`` has one table keyed by (settings,
fingerprint), so looking up k images costs k index probes, however many images are
cached. It runs in write-ahead-log mode: several processes on one machine (a parallel
grid search, Dask workers) read while one writes, and a writer killed mid-write leaves
its transaction rolled back, never a half-written row.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np

FILENAME = "skdeep_features.sqlite"
# Keys per SELECT ... IN (...): well under SQLite's limit on bound parameters.
_LOOKUP_BATCH = 500
_BUSY_TIMEOUT_SECONDS = 120.0
_SCHEMA = """
CREATE TABLE IF NOT EXISTS features (
    settings TEXT NOT NULL,
    key BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (settings, key)
) WITHOUT ROWID
"""


class FeatureCache:
    """Feature rows stored under ``location``, by extractor setting and image.

    Parameters
    ----------
    location : str or path
        The cache folder (created on the first write).
    settings_key : str, optional
        Identity of the extractor settings whose rows :meth:`lookup` and
        :meth:`store` handle; :meth:`info` and :meth:`clear` need none.
    """

    def __init__(self, location: str | os.PathLike, settings_key: str | None = None):
        self.folder = Path(location)
        self.path = self.folder / FILENAME
        self.settings_key = settings_key

    @contextlib.contextmanager
    def _connection(self, create: bool = False) -> Iterator[sqlite3.Connection | None]:
        """Open the database (None when it does not exist and ``create`` is False)."""
        if not self.path.exists():
            if not create:
                yield None
                return
            self.folder.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_SECONDS)
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute(_SCHEMA)
            yield connection
        finally:
            connection.close()

    def lookup(self, fingerprints: list[bytes], n_features: int) -> tuple[np.ndarray, np.ndarray]:
        """Look up rows; return ``(features, missing)``.

        ``features`` holds the rows found in the cache; ``missing`` the indices of the
        rows that are not (their feature rows are left uninitialised). Images that
        appear several times (equal fingerprints) are all filled.
        """
        features = np.empty((len(fingerprints), n_features), dtype=np.float32)
        rows_of: dict[bytes, list[int]] = {}
        for row, key in enumerate(fingerprints):
            rows_of.setdefault(key, []).append(row)
        found = np.zeros(len(fingerprints), dtype=bool)
        keys = list(rows_of)
        with self._connection() as connection:
            for start in range(0, len(keys) if connection else 0, _LOOKUP_BATCH):
                batch = keys[start : start + _LOOKUP_BATCH]
                query = (
                    "SELECT key, value FROM features WHERE settings = ? AND key IN "
                    f"({', '.join('?' * len(batch))})"
                )
                for key, value in connection.execute(query, [self.settings_key, *batch]):
                    row = np.frombuffer(value, dtype=np.float32)
                    if len(row) != n_features:  # written by another layout: a miss
                        continue
                    features[rows_of[key]] = row
                    found[rows_of[key]] = True
        return features, np.flatnonzero(~found)

    def store(self, fingerprints: list[bytes], features: np.ndarray) -> None:
        """Add rows to the cache, in one transaction."""
        if not len(fingerprints):
            return
        rows = np.ascontiguousarray(features, dtype=np.float32)
        with self._connection(create=True) as connection, connection:
            connection.executemany(
                "INSERT OR IGNORE INTO features (settings, key, value) VALUES (?, ?, ?)",
                [
                    (self.settings_key, key, row.tobytes())
                    for key, row in zip(fingerprints, rows, strict=True)
                ],
            )

    def info(self) -> dict:
        """Report the cache: ``images`` (rows), ``settings`` (rows per setting), ``bytes``."""
        with self._connection() as connection:
            counts = (
                dict(connection.execute("SELECT settings, COUNT(*) FROM features GROUP BY 1"))
                if connection
                else {}
            )
        return {"images": sum(counts.values()), "settings": counts, "bytes": self._size()}

    def clear(self) -> int:
        """Delete every row; return the bytes freed on disk."""
        before = self._size()
        with self._connection() as connection:
            if connection is not None:
                with connection:
                    connection.execute("DELETE FROM features")
                connection.execute("VACUUM")
                connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return before - self._size()

    def _size(self) -> int:
        files = [self.path, *(Path(f"{self.path}{suffix}") for suffix in ("-wal", "-shm"))]
        return sum(file.stat().st_size for file in files if file.exists())
