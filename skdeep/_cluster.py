"""Local Dask clusters as skdeep starts them, without importing torch.

The command line starts its cluster in a thread while the main thread imports torch and
builds the network (see ``skdeep.__main__``), so this module imports Dask only.
"""

from __future__ import annotations

import logging
import os

# Dask starts workers with MALLOC_TRIM_THRESHOLD_=65536, which makes glibc hand every
# large tensor's memory back to the system at once: each forward pass then pays for
# fresh pages, and a single-threaded worker ran MobileNet-V2 40% slower (504 against
# 833 images/s at 32 px on a 2-core AMD EPYC). skdeep's own clusters leave it unset.
WORKER_CONFIG = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}


def local_cluster(n_workers: int | None = None, **options):
    """Start a ``LocalCluster`` of single-threaded worker processes on 127.0.0.1.

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
    with dask.config.set(WORKER_CONFIG):
        return LocalCluster(**{**settings, **options})
