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


def local_cluster(n_workers: int | None = None, gpus: list[int] | None = None, **options):
    """Start a ``LocalCluster`` of single-threaded worker processes on 127.0.0.1.

    Where the platform has it, the workers are forked from a fork server that imported
    skdeep's extractor (torch, torchvision) once, so that they start ready to work.

    Parameters
    ----------
    n_workers : int, optional
        Worker processes (default: one per CPU core, or one per GPU of ``gpus``).
    gpus : list of int, optional
        One GPU per worker, as dask-cuda's ``LocalCUDACluster`` places them: worker
        ``i`` sees only GPU ``gpus[i]`` (``CUDA_VISIBLE_DEVICES``), as its ``cuda``
        device. ``n_workers``, if given, must be their number.
    **options
        More ``LocalCluster`` arguments (without ``gpus``); with ``gpus``, options of
        each worker's nanny.

    Returns
    -------
    distributed.LocalCluster or distributed.SpecCluster
        The running cluster (close it, or use it in a ``with`` block).
    """
    import dask
    from distributed import LocalCluster

    if gpus is not None and n_workers is not None and n_workers != len(gpus):
        raise ValueError(
            f"n_workers={n_workers} with gpus={gpus!r}: one worker per GPU, so n_workers "
            f"must be {len(gpus)} (or None)"
        )
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
        if gpus is not None:
            return _gpu_cluster(gpus, settings, options)
        return LocalCluster(**{**settings, **options})


def gpu_worker_specs(gpus: list[int], **nanny_options) -> dict:
    """Worker specifications of a Dask ``SpecCluster``: one single-threaded nanny per GPU.

    Worker ``gpu-<index>`` sees that GPU alone, through ``CUDA_VISIBLE_DEVICES``. The
    indices count the GPUs this process sees: when its own ``CUDA_VISIBLE_DEVICES``
    narrows them (a job given GPUs 2 and 3), index 0 is the first of those, as in torch.

    Raises
    ------
    ValueError
        ``gpus`` does not list distinct indices of GPUs this process sees.
    """
    from distributed import Nanny

    if not gpus or len(set(gpus)) != len(gpus) or any(int(g) < 0 for g in gpus):
        raise ValueError(f"gpus must list distinct GPU indices (0 or more); got {gpus!r}")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    shown = [part.strip() for part in visible.split(",") if part.strip()] if visible else None
    if shown is not None and max(gpus) >= len(shown):
        raise ValueError(
            f"gpus={gpus!r}: this process sees {len(shown)} GPU(s) "
            f"(CUDA_VISIBLE_DEVICES={visible!r}), so indices run from 0 to {len(shown) - 1}"
        )
    return {
        f"gpu-{gpu}": {
            "cls": Nanny,
            "options": {
                "nthreads": 1,
                "host": "127.0.0.1",
                **nanny_options,
                "env": {
                    **nanny_options.get("env", {}),
                    "CUDA_VISIBLE_DEVICES": str(gpu) if shown is None else shown[gpu],
                },
            },
        }
        for gpu in gpus
    }


def _gpu_cluster(gpus: list[int], settings: dict, options: dict):
    """Start a ``SpecCluster`` of :func:`gpu_worker_specs` with a scheduler on loopback."""
    from distributed import Scheduler, SpecCluster

    scheduler = {
        "cls": Scheduler,
        "options": {"host": settings["host"], "dashboard_address": settings["dashboard_address"]},
    }
    return SpecCluster(
        workers=gpu_worker_specs(gpus, **options),
        scheduler=scheduler,
        silence_logs=settings["silence_logs"],
    )


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
