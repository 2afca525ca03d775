"""Scaling out on Dask: lazy features of Dask arrays, and file lists to feature stores.

``pip install "skdeep[dask]"`` brings Dask's distributed scheduler and zarr.

- ``FeatureExtractor.transform`` of a ``dask.array`` returns a lazy ``dask.array``
  of features with the same row chunks (see :func:`transform_array`); dask-ml's
  ``ParallelPostFit`` wraps an extractor like any scikit-learn transformer.
- :func:`extract` runs an extractor over a list of image files on a
  ``distributed.Client`` (a ``LocalCluster`` when none is given) and writes the
  features into a zarr store, one chunk per partition, as they are computed.

Every process builds the network once and reuses it for all its tasks: an unpickled
extractor rebuilds its network on first use through a per-process store of networks,
whatever number of copies of it Dask deserializes. Dask reruns the tasks of a worker
that dies; a rerun of :func:`extract` after an interruption computes only the chunks
that are missing. skdeep adds no scheduler of its own.

:func:`local_cluster` starts what ``--workers`` starts: single-threaded worker processes
on 127.0.0.1, without Dask's ``MALLOC_TRIM_THRESHOLD_`` (with it, glibc hands every
large tensor's memory back at once and single-threaded inference slows down; set
``distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_`` to null in the Dask
configuration of your own clusters for the same gain). :data:`WORKER_CONFIG` is that
setting, as a Dask configuration.

One GPU per worker: with ``device="auto"`` or ``"cuda"`` each worker uses the GPU it
sees, so give each worker its own with ``CUDA_VISIBLE_DEVICES``:
``local_cluster(gpus=[0, 1])`` (and the command line's ``--device cuda --workers N``)
starts one worker per GPU that way, as dask-cuda's ``LocalCUDACluster`` does for every
GPU of a machine.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from dataclasses import dataclass

import numpy as np
from sklearn.base import clone
from sklearn.utils.validation import check_is_fitted

from ._cluster import WORKER_CONFIG, local_cluster
from ._images import load_npy
from ._progress import progress_bar
from ._store import FeatureStore, open_store

__all__ = ["WORKER_CONFIG", "extract", "local_cluster", "transform_array"]

DEFAULT_PARTITION_SIZE = 1024


def transform_array(extractor, X):
    """Return lazy features of a Dask array of images, with the row chunks of ``X``.

    Parameters
    ----------
    extractor : FeatureExtractor
        A fitted extractor.
    X : dask.array.Array of shape (n, H, W), (n, H, W, C) or (n, H*W)
        Images (flat rows need the extractor's ``image_shape``), chunked along n.

    Returns
    -------
    dask.array.Array of shape (n, ``n_features_out_``), float32
        Nothing is computed until asked.
    """
    import dask
    import dask.array as da

    check_is_fitted(extractor)
    if X.ndim not in (2, 3, 4):
        raise ValueError(
            "X must be a Dask array of images (n, H, W), (n, H, W, C) or flat rows "
            f"(n, H*W) with image_shape; got {X.ndim} dimensions"
        )
    width = extractor.n_features_out_
    whole_images = X.rechunk({axis: -1 for axis in range(1, X.ndim)})
    # One graph node holds the extractor: each worker receives it once.
    shared = dask.delayed(extractor, pure=True)
    return da.map_blocks(
        _transform_block,
        whole_images,
        shared,
        dtype=np.float32,
        chunks=(whole_images.chunks[0], (width,)),
        drop_axis=list(range(2, X.ndim)),
        meta=np.empty((0, width), dtype=np.float32),
    )


def _transform_block(block: np.ndarray, extractor) -> np.ndarray:
    if len(block) == 0:
        return np.empty((0, extractor.n_features_out_), dtype=np.float32)
    return extractor.transform(block)


# ----------------------------------------------------------------------------------------
# File lists to feature stores
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Partition:
    """The images of one chunk: a slice of a file list, or rows of a .npy file."""

    paths: tuple[str, ...] = ()
    npy: str | None = None
    start: int = 0
    stop: int = 0

    def load(self):
        """Return what ``FeatureExtractor.transform`` takes for these images."""
        if self.npy is not None:
            return np.load(self.npy, mmap_mode="r")[self.start : self.stop]
        return list(self.paths)


def _compute_partition(extractor, store: FeatureStore, chunk: int, partition: _Partition) -> int:
    """Compute one chunk and write it; return the number of images computed.

    The process first checks that it computes the features the store holds (the
    precision and device type of the driver's extractor; rebuilding the network checks
    its weights).
    """
    if store.chunk_done(chunk):  # written by an earlier attempt of this task
        return 0
    store.check_extractor(extractor)
    rows = extractor.transform(partition.load())
    store.write_chunk(chunk, rows)
    return len(rows)


def extract(
    extractor,
    images,
    out: str | os.PathLike,
    *,
    labels=None,
    client=None,
    n_workers: int | None = None,
    partition_size: int = DEFAULT_PARTITION_SIZE,
    overwrite: bool = False,
    verbose: bool = True,
) -> FeatureStore:
    """Extract the features of many images into a zarr feature store.

    The images are cut into partitions of ``partition_size``; each partition is a
    task that writes one chunk of the store as soon as it is done, so memory stays
    bounded and an interrupted run keeps its finished chunks. Running the same call
    again computes only the missing chunks and ends with exactly the features an
    uninterrupted run gives. Open the result with :func:`skdeep.load_features`.

    Parameters
    ----------
    extractor : FeatureExtractor
        Fitted or not (an unfitted one is fitted without images). Its network is built
        once per worker process.
    images : list of str, or str
        Image file paths, or the path of a ``.npy`` array of images (each worker
        memory-maps the rows of its partitions).
    out : str or path
        The ``.zarr`` folder to write (on a file system every worker can reach).
    labels : list, optional
        One label per image, stored beside the features.
    client : distributed.Client, optional
        The cluster to run on. None starts a ``LocalCluster`` of ``n_workers``
        single-threaded worker processes on 127.0.0.1 and closes it at the end.
    n_workers : int, optional
        Workers of the local cluster (default: one per CPU core). 0 runs every
        partition in this process, without Dask.
    partition_size : int, default=1024
        Images per task and per chunk of the store; a multiple of the extractor's
        ``batch_size`` gives batches identical to a single ``transform`` call.
    overwrite : bool, default=False
        Replace whatever is at ``out``. Without it, an existing store is resumed when
        it was made with the same settings and images, and refused otherwise.
    verbose : bool, default=True
        Show one progress bar for the whole job (the images of finished chunks, from
        every worker), or say that the store is already complete.

    Returns
    -------
    FeatureStore
        Where the store is and how it is chunked.

    Raises
    ------
    ValueError
        ``out`` holds a store of other settings or images (without ``overwrite``), or
        an image cannot be read.
    OSError
        ``out`` cannot be written.
    """
    if not isinstance(partition_size, (int, np.integer)) or partition_size < 1:
        raise ValueError(f"partition_size must be a positive int; got {partition_size!r}")
    partitions, paths, n_images = _partitions(images, int(partition_size))
    if labels is not None and len(labels) != n_images:
        raise ValueError(f"labels has {len(labels)} entries but there are {n_images} images")
    if not hasattr(extractor, "n_features_out_"):  # not fitted: fit a copy
        extractor = clone(extractor).fit()
    store = open_store(
        out,
        extractor=extractor,
        n_images=n_images,
        paths=paths,
        npy=None if paths is not None else os.fspath(images),
        labels=labels,
        partition_size=int(partition_size),
        overwrite=overwrite,
    )
    missing = store.missing_chunks()
    to_compute = sum(stop - start for start, stop in map(store.rows, missing))
    if not missing:
        if verbose:
            print(f"{n_images}/{n_images} already in {os.fspath(out)}", file=sys.stderr)
        store.mark_complete()
        return store
    done = n_images - to_compute  # by an earlier run
    with progress_bar(n_images, "skdeep extract", verbose, initial=done) as progress:
        if n_workers == 0 and client is None:
            for chunk in missing:
                progress.update(_compute_partition(extractor, store, chunk, partitions[chunk]))
        else:
            _run_on_dask(extractor, store, missing, partitions, client, n_workers, progress)
    store.mark_complete()
    return store


def _partitions(images, partition_size: int) -> tuple[list[_Partition], list | None, int]:
    if isinstance(images, (str, os.PathLike)):
        path = os.fspath(images)
        if not path.endswith(".npy"):
            raise ValueError(f"images must be a list of files or a .npy path; got {path!r}")
        n_images = len(load_npy(path))
        bounds = [
            (s, min(s + partition_size, n_images)) for s in range(0, n_images, partition_size)
        ]
        return [_Partition(npy=path, start=a, stop=b) for a, b in bounds], None, n_images
    paths = [os.fspath(path) for path in images]
    if not paths:
        raise ValueError("images is empty: nothing to extract")
    for index, path in enumerate(paths):
        if not os.path.isfile(path):
            raise ValueError(f"images[{index}]: image file {path!r} does not exist")
    partitions = [
        _Partition(paths=tuple(paths[start : start + partition_size]))
        for start in range(0, len(paths), partition_size)
    ]
    return partitions, paths, len(paths)


def _run_on_dask(extractor, store, missing, partitions, client, n_workers, progress) -> None:
    """Submit one task per missing chunk and count the images of finished tasks."""
    from distributed import as_completed

    # Worker processes are daemons and cannot start DataLoader workers; the cluster's
    # own workers decode the images in parallel instead.
    worker_extractor = copy.copy(extractor).set_params(num_workers=0)
    with _client(client, n_workers) as active:
        # One copy on every worker (a replacement worker fetches it from the others),
        # instead of one copy inside every task.
        held = active.scatter(worker_extractor, broadcast=True, hash=False)
        futures = [
            active.submit(_compute_partition, held, store, chunk, partitions[chunk], pure=False)
            for chunk in missing
        ]
        try:
            for future in as_completed(futures):
                progress.update(future.result())
        except BaseException:
            active.cancel([*futures, held])
            raise


@contextlib.contextmanager
def _client(client, n_workers: int | None):
    """Use ``client``, or start a local cluster of single-threaded workers."""
    if client is not None:
        yield client
        return
    from distributed import Client

    cluster = local_cluster(n_workers)
    try:
        with Client(cluster) as local:
            yield local
    finally:
        cluster.close()
