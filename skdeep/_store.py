"""Feature stores: features written chunk by chunk into a zarr group on disk.

Layout of ``features.zarr`` (a zarr v3 group, readable by zarr, Dask and xarray)::

    features       float32 (n_images, n_features), chunks of ``partition_size`` rows
    paths          str (n_images,)      the image files (absent for array inputs)
    fingerprints   uint8 (n_images, 16) path, size and modification time of each file
    labels         str (n_images,)      first-level sub-folder names (when known)
    feature_names  str (n_features,)
    attributes     "skdeep": format version, extractor parameters, the identity of the
                   features (:func:`skdeep._identity.feature_identity`) and of the input

Each chunk of ``features`` holds one partition and is written once, atomically (zarr's
local store writes a temporary file and renames it, from zarr 3.1.3 on), so a chunk
file that exists is complete. A run that stops (Ctrl-C, a killed process or worker)
leaves the chunks it finished; the next run with the same settings and input computes
only the missing ones, and every worker checks that it computes the features the
store holds before it writes. Missing chunks read as NaN (the fill value), which
:func:`load_features` refuses.

``zarr`` comes with ``pip install "skdeep[dask]"``.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._compat import optional_import
from ._identity import differences, feature_identity, file_fingerprint, input_identity

FORMAT = "skdeep-features-2"


def _zarr():
    return optional_import("zarr", "feature stores", "dask")


def describe_parameters(params: dict) -> dict:
    """Turn extractor parameters into JSON values (modules and paths become text)."""
    described = {}
    for key, value in params.items():
        if isinstance(value, (str, int, float, bool)) or value is None:
            described[key] = value
        elif isinstance(value, dict):
            described[key] = {str(k): str(v) for k, v in value.items()}
        elif isinstance(value, (list, tuple)):
            described[key] = [v if isinstance(v, (str, int, float)) else str(v) for v in value]
        else:
            is_path = isinstance(value, os.PathLike)
            described[key] = os.fspath(value) if is_path else f"<{type(value).__name__}>"
    return described


@dataclass
class FeatureStore:
    """An open feature store: where it lives, how its rows are chunked, what it holds."""

    path: Path
    n_images: int
    n_features: int
    partition_size: int
    identity: dict = field(default_factory=dict)  # of the features it holds

    @property
    def n_chunks(self) -> int:
        """Number of chunks (partitions) of the ``features`` array."""
        return -(-self.n_images // self.partition_size)

    def rows(self, chunk: int) -> tuple[int, int]:
        """Return the first and past-the-last row of ``chunk``."""
        start = chunk * self.partition_size
        return start, min(start + self.partition_size, self.n_images)

    def features(self, mode: str = "r"):
        """Open the ``features`` zarr array."""
        return _zarr().open_array(self.path / "features", mode=mode)

    def chunk_done(self, chunk: int) -> bool:
        """Tell whether the chunk file exists (zarr writes chunks atomically)."""
        array = self.features()
        return (self.path / "features" / array.metadata.encode_chunk_key((chunk, 0))).is_file()

    def missing_chunks(self) -> list[int]:
        """List the chunks not written yet."""
        return [chunk for chunk in range(self.n_chunks) if not self.chunk_done(chunk)]

    def check_extractor(self, extractor) -> None:
        """Raise a ValueError unless ``extractor`` computes the features this store holds.

        Every process that writes a chunk checks this first: a Dask worker that
        rebuilt the network with other weights, or computes at another precision or on
        another kind of device, never mixes its rows into the store.
        """
        current = feature_identity(extractor)
        if current != self.identity:
            changed = "; ".join(differences(self.identity, current))
            raise ValueError(
                f"out: this process would compute other features than "
                f"{os.fspath(self.path)!r} holds ({changed}); give every worker the same "
                "hardware and software, or extract into another store"
            )

    def write_chunk(self, chunk: int, rows: np.ndarray) -> None:
        """Write the features of one partition (one chunk file, atomically)."""
        start, stop = self.rows(chunk)
        if rows.shape != (stop - start, self.n_features):
            raise ValueError(
                f"chunk {chunk} needs features of shape {(stop - start, self.n_features)}; "
                f"got {rows.shape}"
            )
        self.features(mode="r+")[start:stop] = rows

    def mark_complete(self) -> None:
        """Record in the attributes that every chunk is written."""
        group = _zarr().open_group(self.path, mode="r+")
        info = dict(group.attrs["skdeep"])
        info["complete"] = True
        group.attrs["skdeep"] = info


def open_store(
    path: str | os.PathLike,
    *,
    extractor,
    n_images: int,
    paths: list[str] | None = None,
    npy: str | None = None,
    labels: list | None = None,
    partition_size: int,
    overwrite: bool = False,
) -> FeatureStore:
    """Create the store at ``path``, or reopen it to resume an interrupted run.

    Parameters
    ----------
    path : str or path
        The ``.zarr`` folder.
    extractor : FeatureExtractor
        The fitted extractor whose features the store holds.
    n_images : int
        Rows of the store.
    paths : list of str, optional
        The image files (stored beside the features, with their fingerprints).
    npy : str, optional
        The ``.npy`` file of images, for array inputs.
    labels : list, optional
        Stored beside the features.
    partition_size : int
        Rows per chunk.
    overwrite : bool, default=False
        Replace whatever is at ``path``.

    Returns
    -------
    FeatureStore
        The open store.

    Raises
    ------
    ValueError
        ``path`` holds something else than a store of these features and input, and
        ``overwrite`` is False.
    OSError
        ``path`` cannot be written.
    """
    zarr = _zarr()
    path = Path(path)
    feature_names = [str(name) for name in extractor.feature_names_out_]
    described = describe_parameters(extractor.get_params())
    identity = feature_identity(extractor)
    inputs = input_identity(paths=paths, npy=npy, labels=labels)
    store = FeatureStore(path, n_images, len(feature_names), int(partition_size), identity)
    if path.exists() and overwrite:
        _remove(path)
    if path.exists():
        existing = _read_info(path)
        _check_same(path, existing, identity, described, inputs, n_images, int(partition_size))
        return store
    _check_writable(path)
    group = zarr.open_group(path, mode="w")
    group.create_array(
        "features",
        shape=(n_images, len(feature_names)),
        chunks=(int(partition_size), len(feature_names)),
        dtype="float32",
        fill_value=np.nan,
        config={"write_empty_chunks": True},  # every chunk file exists once written
    )
    _write_strings(group, "feature_names", list(feature_names), len(feature_names))
    if paths is not None:
        _write_strings(group, "paths", paths, partition_size)
        fingerprints = group.create_array(
            "fingerprints", shape=(n_images, 16), chunks=(partition_size, 16), dtype="uint8"
        )
        fingerprints[:] = _fingerprints(paths)
    if labels is not None:
        _write_strings(group, "labels", [str(label) for label in labels], partition_size)
    group.attrs["skdeep"] = {
        "format": FORMAT,
        "params": described,
        "complete": False,
        "identity": identity,
        "input": inputs,
        "n_images": int(n_images),
        "partition_size": int(partition_size),
    }
    return store


def _fingerprints(paths: list[str]) -> np.ndarray:
    return np.frombuffer(b"".join(map(file_fingerprint, paths)), np.uint8).reshape(-1, 16)


def _write_strings(group, name: str, values: list[str], chunk: int) -> None:
    array = group.create_array(name, shape=(len(values),), chunks=(max(1, chunk),), dtype=str)
    if values:
        array[:] = np.asarray(values, dtype=object)


def _read_info(path: Path) -> dict:
    zarr = _zarr()
    try:
        group = zarr.open_group(path, mode="r")
        info = dict(group.attrs["skdeep"])
    except Exception as exc:  # not zarr, not a group, no skdeep attributes, ...
        raise ValueError(
            f"out: {os.fspath(path)!r} exists and is not a skdeep feature store; choose "
            "another path, or pass overwrite=True (--overwrite) to replace it"
        ) from exc
    if info.get("format") != FORMAT:
        raise ValueError(f"out: {os.fspath(path)!r} is a store of another format")
    return info


def _check_same(
    path: Path,
    existing: dict,
    identity: dict,
    params: dict,
    inputs: dict,
    n_images: int,
    partition_size: int,
) -> None:
    """Raise a ValueError naming the first difference between a store and this run."""
    where = f"out: {os.fspath(path)!r} was made"
    advice = "; pass overwrite=True (--overwrite) to replace it, or choose another path"
    if existing["identity"] != identity:
        changed = differences(existing["identity"], identity)
        keys = [item.partition("=")[0] for item in changed]
        if keys == ["weights"]:
            raise ValueError(
                f"{where} with other network weights (weights=None draws new random weights "
                f"unless random_state is set){advice}"
            )
        stored_params = existing.get("params", {})
        named = differences({key: stored_params.get(key) for key in params}, params)
        if named:  # the parameters behind the difference, as the user wrote them
            raise ValueError(
                f"{where} with {'; '.join(named)} (its features differ in "
                f"{', '.join(keys)}){advice}"
            )
        raise ValueError(f"{where} with other features: {'; '.join(changed)}{advice}")
    if existing["n_images"] != n_images or existing["input"]["files"] != inputs["files"]:
        raise ValueError(f"{where} from other images{_changed_file(path, n_images)}{advice}")
    if existing["input"]["npy"] != inputs["npy"]:
        raise ValueError(f"{where} from another .npy file, or the file changed since{advice}")
    if existing["input"]["labels"] != inputs["labels"]:
        raise ValueError(f"{where} with other labels{advice}")
    if existing["partition_size"] != partition_size:
        raise ValueError(
            f"{where} with partition_size={existing['partition_size']}, not "
            f"{partition_size}{advice}"
        )


def _changed_file(path: Path, n_images: int) -> str:
    """Say which file differs from the one a store was made from, where it can."""
    group = _zarr().open_group(path, mode="r")
    if "paths" not in group or group["paths"].shape[0] != n_images:
        return f" (another list of files: {n_images} now)"
    stored = [str(value) for value in group["paths"][:].tolist()]
    fingerprints = np.asarray(group["fingerprints"][:])
    for index, stored_path in enumerate(stored):
        exists = os.path.isfile(stored_path)
        if not exists or fingerprints[index].tobytes() != file_fingerprint(stored_path):
            state = "changed since" if exists else "missing"
            return f" ({stored_path!r}, image {index}, is {state})"
    return " (another list of files)"


def _check_writable(path: Path) -> None:
    parent = path.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"out: cannot create the folder {os.fspath(parent)!r}: {exc}") from exc
    if not os.access(parent, os.W_OK):
        raise OSError(f"out: cannot write in {os.fspath(parent)!r} (permission denied)")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def load_features(path: str | os.PathLike) -> dict:
    """Open a feature store written by ``python -m skdeep extract --out features.zarr``.

    Parameters
    ----------
    path : str or path
        The ``.zarr`` folder.

    Returns
    -------
    dict
        ``features``: a lazy ``dask.array`` (n_images, n_features) of float32 when Dask
        is installed, else the zarr array (both read chunks on demand; ``np.asarray``
        loads all); ``paths``, ``labels`` (arrays of str, or None); ``feature_names``;
        ``params``: the extractor's parameters.

    Raises
    ------
    ValueError
        ``path`` is not a feature store, or the run that writes it has not finished.
    """
    zarr = _zarr()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"path: no feature store at {os.fspath(path)!r}")
    info = _read_info(path)
    group = zarr.open_group(path, mode="r")
    features = group["features"]
    store = FeatureStore(
        path, features.shape[0], features.shape[1], features.chunks[0], info["identity"]
    )
    missing = store.missing_chunks() if not info.get("complete") else []
    if missing:
        raise ValueError(
            f"path: the store {os.fspath(path)!r} is incomplete: {len(missing)} of "
            f"{store.n_chunks} chunks are missing (the run that writes it stopped); run "
            "the same command again to compute only those"
        )
    try:
        import dask.array as da

        features = da.from_zarr(features)
    except ImportError:
        pass

    def strings(name):
        return np.array(group[name][:].tolist(), dtype=str) if name in group else None

    return {
        "features": features,
        "paths": strings("paths"),
        "labels": strings("labels"),
        "feature_names": strings("feature_names"),
        "params": info["params"],
    }
