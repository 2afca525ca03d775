"""Local Dask clusters as skdeep starts them, without importing torch.

The command line starts its cluster in a thread while the main thread imports torch and
builds the network (see ``skdeep.__main__``), so this module imports Dask only (the
fork server, a separate process, imports torch for the workers).
"""

from __future__ import annotations

import logging
import multiprocessing
import os

# Dask starts workers with MALLOC_TRIM_THRESHOLD_=65536, which makes glibc hand every
# large tensor's memory back to the system at once: each forward pass then pays for
# fresh pages, and a single-threaded worker ran MobileNet-V2 40% slower (504 against
# 833 images/s at 32 px on a 2-core AMD EPYC). skdeep's own clusters leave it unset.
WORKER_CONFIG = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}


def local_cluster(n_workers: int | None = None, **options):
    """Start a ``LocalCluster`` of single-threaded worker processes on 127.0.0.1.

    Where the platform has it, the workers are forked from a fork server that imported
    skdeep's extractor (torch, torchvision) once, so that they start ready to work.

    Parameters
    ----------
    n_workers : int, optional
        Worker processes (default: one per CPU core).
    **options
        More ``LocalCluster`` arguments.

    Returns
    -------
    distributed.LocalCluster
        The running cluster (close it, or use it in a ``with`` block).
    """
    import dask
    from distributed import LocalCluster

    settings = dict(
        n_workers=n_workers or os.cpu_count() or 1,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",  # the scheduler's HTTP server, on loopback too
        silence_logs=logging.ERROR,
    )
    forkserver = "forkserver" in multiprocessing.get_all_start_methods()
    config = dict(WORKER_CONFIG)
    if forkserver:
        config["distributed.worker.multiprocessing-method"] = "forkserver"
    with dask.config.set(config):
        if forkserver:
            _preload_forkserver()
        return LocalCluster(**{**settings, **options})


# What the fork server imports once, before it forks the workers: each worker then starts
# with torch, torchvision and skdeep's extractor imported, instead of importing them
# itself (about 5 s of CPU per process, which the workers paid together on few cores).
FORKSERVER_PRELOAD = ["distributed", "skdeep.feature_extraction"]


def _preload_forkserver() -> None:
    """Make the fork server, when it starts, import :data:`FORKSERVER_PRELOAD`.

    Distributed sets its own preload list (Dask's dependencies) the first time it asks
    for the fork-server context, and only that time: ask first, then replace the list.
    A fork server that already runs keeps what it imported; workers then import the
    rest themselves, as with the spawn start method.
    """
    from distributed.utils import get_mp_context

    get_mp_context().set_forkserver_preload(FORKSERVER_PRELOAD)
