"""Data-parallel training on torch.distributed: ranks spawned by ``fit``, or torchrun's.

``FineTuneClassifier(devices=n).fit`` trains with ``n`` processes (one per GPU on
CUDA, with NCCL; ``n`` CPU processes with gloo). Two ways in:

- from a plain Python process, ``fit`` spawns the ranks itself (:func:`spawn_fit`,
  spawn start method, rendezvous on 127.0.0.1), and rank 0 hands the fitted state
  back;
- under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set), ``fit`` joins the
  process group that exists (:func:`active_context`) and every rank ends fitted.

PyTorch does the work: DistributedDataParallel averages gradients, and collectives
reduce the metrics and gather the features of a domain-adaptation penalty. Which rows
each rank takes is the data plan's decision (:mod:`skdeep._data_plan`).

Process lifecycle of spawned ranks: the parent hosts the rendezvous store on a port the
operating system picks (nothing can take it in between) and holds a lock on the shared
temporary folder; every rank watches its parent and, when the parent is gone (killed,
even by SIGKILL), removes the folder and exits, as it does when it is terminated
itself; a later fit removes folders whose lock nobody holds (every process killed at
once). Ctrl-C reaches the parent and the ranks: the ranks agree after each step on
whether any of them got it, stop at the same step, and the parent returns their
estimator, as one process does. A collective that does not complete within
``collective_timeout`` seconds raises on the ranks that wait, naming the rank and the
step.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import pickle
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ._compat import BatchNorm

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_FOLDER_PREFIX = "skdeep-ranks-"  # then the parent's process id and a dash
_OWNER_FILE = "owner.lock"  # locked by the parent while its fit runs
_PAYLOAD = "payload.pkl"  # the estimator and arguments every rank loads
_PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)


@dataclass
class DistributedContext:
    """Where this process stands among the ranks that train together.

    Attributes
    ----------
    rank, world_size : int
        This rank and the number of ranks.
    device : torch.device
        This rank's device.
    spawned : bool
        Whether skdeep spawned the ranks (rank 0 then hands the result back) or
        torchrun did.
    timeout : float or None
        Seconds a collective waits for the other ranks (for error messages; None when
        the script made the process group).
    """

    rank: int
    world_size: int
    device: torch.device
    spawned: bool = False
    timeout: float | None = 300.0

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the one that prints and writes."""
        return self.rank == 0

    def broadcast_int(self, value: int) -> int:
        """Return rank 0's ``value`` on every rank."""
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.broadcast(tensor, 0)
        return int(tensor.item())

    def any(self, flag: bool) -> bool:
        """Return whether ``flag`` is true on any rank (every rank gets the same answer)."""
        tensor = torch.tensor([int(flag)], dtype=torch.int32, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def check_same_inputs(self, summary: list[int], what: str) -> None:
        """Refuse, on every rank, inputs that differ from rank 0's.

        ``summary`` is a few integers describing this rank's inputs (counts, digests);
        every rank must pass the same data, which the data plan then shares out.

        Raises
        ------
        ValueError
            Some rank's summary differs from another's.
        """
        mine = torch.tensor(summary, dtype=torch.int64, device=self.device)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine)
        rows = [part.tolist() for part in gathered]
        differ = [rank for rank, row in enumerate(rows) if row != rows[0]]
        if differ:
            raise ValueError(
                f"every process must pass fit the same {what} (the processes share the rows "
                f"out among themselves): rank {differ[0]}'s differ from rank 0's in their "
                f"counts, labels or sampled images (rows per rank: {[row[0] for row in rows]}); "
                "pass the whole data on every rank, in the same order, not a shard"
            )

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over the ranks (a new tensor; no gradient)."""
        total = values.detach().clone().to(self.device)
        dist.all_reduce(total)
        return total

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Give every rank rank 0's buffers (running statistics) of ``model``."""
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's rows in rank order, with gradients to each part."""
        return _Gather.apply(rows)

    def wrap(self, model: nn.Module) -> nn.Module:
        """Wrap ``model`` in DistributedDataParallel (which broadcasts rank 0's weights)."""
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)


# torch.distributed.nn.functional's differentiable collectives are deprecated in favour
# of private functional collectives; this is the same few lines on the public
# collectives, with the gradients of DistributedDataParallel's convention: every rank
# backpropagates its own loss, and a sum's gradient reaches every contribution.


class _Gather(torch.autograd.Function):
    """All-gather (concatenated in rank order) forward; this rank's part of the sum backward.

    The summed gradient: every rank backpropagates the same loss of the gathered rows.
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, rows.contiguous())
        ctx.rank, ctx.size = dist.get_rank(), len(rows)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        return total[ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size]


_active: DistributedContext | None = None


def active_context(
    devices, device: torch.device, timeout: float = 300.0
) -> DistributedContext | None:
    """Return the context this ``fit`` trains in: a spawned rank's, torchrun's, or None.

    Under torchrun with ``devices`` of 2 or more, the process group is initialised
    here (once, with collectives timing out after ``timeout`` seconds; an existing one
    is used as it is): on the GPU of this process's local rank when the estimator's
    resolved ``device`` is CUDA (NCCL), else on the CPU (gloo).
    """
    if _active is not None:
        return _active
    if not (_launched_by_torchrun() and _count(devices) > 1):
        return None
    world_size = int(os.environ["WORLD_SIZE"])
    if _count(devices) != world_size:
        raise ValueError(
            f"devices={devices!r} asks for {_count(devices)} processes, but torchrun started "
            f"{world_size}; pass devices={world_size} (or run torchrun with "
            f"--nproc-per-node {_count(devices)})"
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"torchrun started this process as local rank {local_rank}, but this machine "
                f"has {torch.cuda.device_count()} GPU(s): start at most that many processes "
                "per machine (--nproc-per-node), or train on the CPU with device='cpu'"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    global _group_timeout
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout)
        )
        _group_timeout = timeout
    # A group made before (by an earlier fit, or the script) keeps its own timeout.
    return DistributedContext(
        dist.get_rank(), dist.get_world_size(), device, timeout=_group_timeout
    )


# The timeout of the process group skdeep made in this process under torchrun (None:
# none made, or the script made its own, whose timeout skdeep does not know).
_group_timeout: float | None = None


@contextlib.contextmanager
def watch_collectives(context: DistributedContext | None, where: str):
    """Turn a failed collective into an error that names this rank and ``where`` it failed.

    A collective fails when another rank died or raised (its connection closes), or when
    one does not arrive within the context's timeout. Alone (``context`` None), nothing
    is watched.
    """
    if context is None:
        yield
        return
    try:
        yield
    except (dist.DistError, RuntimeError) as exc:
        text = str(exc)
        if not isinstance(exc, dist.DistError) and not _COLLECTIVE_FAILURE.search(text):
            raise
        timed_out = re.search(r"timed out|timeout", text, re.IGNORECASE)
        limit = (
            f"collective_timeout={context.timeout:g} s"
            if context.timeout is not None
            else "the timeout of the process group the script made"
        )
        reason = (
            f"did not complete within {limit} (another process hangs, or is slower than that)"
            if timed_out
            else "failed (another process died or raised)"
        )
        raise RuntimeError(
            f"rank {context.rank} of {context.world_size}: a collective at {where} "
            f"{reason}: {text.strip().splitlines()[0] if text.strip() else type(exc).__name__}"
        ) from exc


# What a collective's failure says when PyTorch raises it as a plain RuntimeError (the
# gradient averaging of DistributedDataParallel, inside backward): the backend's name in
# its source path or message. A user's own error that merely says "timed out" is not one.
_COLLECTIVE_FAILURE = re.compile(r"\bgloo\b|/gloo/|\bnccl\b|ProcessGroup|c10d", re.IGNORECASE)


def in_process_group() -> bool:
    """Whether this process is a rank already: spawned by skdeep, or started by torchrun."""
    return _active is not None or _launched_by_torchrun()


def _launched_by_torchrun() -> bool:
    return all(name in os.environ for name in _TORCHRUN_VARIABLES)


def _count(devices) -> int:
    if devices is None:
        return 1
    return len(devices) if isinstance(devices, (list, tuple)) else int(devices)


def check_devices(devices, device: torch.device) -> list[int] | int | None:
    """Validate the ``devices`` parameter against the resolved ``device``.

    Returns None for one process, else the number of CPU processes or the CUDA device
    indices.

    Raises
    ------
    ValueError
        Not None, a positive int or a list of distinct CUDA indices; a list on the
        CPU; more GPUs than this machine has (outside torchrun, where ``devices``
        counts the processes of every machine).
    """
    torchrun = _launched_by_torchrun()
    expected = (
        "devices must be None, a positive int (the number of processes) or a list of "
        "distinct CUDA device indices"
    )
    if devices is None or (isinstance(devices, Integral) and not isinstance(devices, bool)):
        if devices is not None and devices < 1:
            raise ValueError(f"{expected}; got {devices!r}")
        count = 1 if devices is None else int(devices)
        if count == 1:
            return None
        # Under torchrun, the count is of all machines' processes (see active_context).
        if device.type == "cuda" and count > torch.cuda.device_count() and not torchrun:
            raise ValueError(
                f"devices={devices} asks for {count} GPUs, but this machine has "
                f"{torch.cuda.device_count()}"
            )
        return list(range(count)) if device.type == "cuda" else count
    if not isinstance(devices, (list, tuple)) or not devices:
        raise ValueError(f"{expected}; got {devices!r}")
    indices = list(devices)
    if not all(isinstance(i, Integral) and not isinstance(i, bool) and i >= 0 for i in indices):
        raise ValueError(f"{expected}; got {devices!r}")
    if len(set(indices)) < len(indices):
        raise ValueError(f"{expected}; got {devices!r}, which repeats an index")
    if device.type != "cuda":
        raise ValueError(
            f"devices={devices!r} lists GPUs, but the device is {device.type}; on the CPU "
            "pass the number of processes, as in devices=2"
        )
    missing = [i for i in indices if i >= torch.cuda.device_count()]
    if missing:
        raise ValueError(
            f"devices={devices!r}: this machine has no CUDA device {missing[0]} "
            f"({torch.cuda.device_count()} in all)"
        )
    return None if len(indices) == 1 and indices == [0] else [int(i) for i in indices]


# ----------------------------------------------------------------------------------------
# Spawning ranks from fit
# ----------------------------------------------------------------------------------------


def spawn_fit(
    estimator,
    fit: Callable,
    arguments: dict,
    processes: list[int] | int,
    collective_timeout: float = 300.0,
):
    """Run ``fit(estimator, **arguments)`` in data-parallel ranks; return rank 0's estimator.

    Parameters
    ----------
    estimator : estimator
        Pickled to every rank (its parameters).
    fit : callable
        A module-level function ``fit(estimator, **arguments)`` run in every rank.
    arguments : dict
        NumPy arrays among them are written once to temporary ``.npy`` files that every
        rank memory-maps (shared through the page cache, not copied per rank); other
        values are pickled.
    processes : int or list of int
        The number of CPU processes, or the CUDA device of each rank.
    collective_timeout : float, default=300.0
        Seconds a collective waits for the other ranks before it fails.

    Raises
    ------
    Exception
        The error a rank raised (its own type where it pickles), with that rank's
        traceback in its notes; a RuntimeError when a rank was killed by a signal.
    """
    import torch.multiprocessing as mp

    gpus = processes if isinstance(processes, list) else None
    world_size = len(gpus) if gpus else int(processes)
    _remove_abandoned_folders()
    prefix = f"{_FOLDER_PREFIX}{os.getpid()}-"
    # A rank that is terminated removes the folder itself: cleaning up after it may
    # find nothing to remove.
    with (
        tempfile.TemporaryDirectory(prefix=prefix, ignore_cleanup_errors=True) as folder,
        _ownership(folder),
    ):
        shared = {key: _shareable(value, folder, key) for key, value in arguments.items()}
        payload = os.path.join(folder, _PAYLOAD)
        with open(payload, "wb") as file:
            pickle.dump((estimator, fit, shared), file)
        # The rendezvous store lives in this process, on a port the system picks when it
        # binds: no other process can take the port between choosing and binding it.
        store = dist.TCPStore(
            "127.0.0.1",
            0,
            is_master=True,
            wait_for_workers=False,
            timeout=datetime.timedelta(seconds=collective_timeout),
        )
        # The ranks take Ctrl-C as the caller does: as KeyboardInterrupt, or not at all
        # (a caller that ignores it, or handles it itself).
        interruptible = signal.getsignal(signal.SIGINT) is signal.default_int_handler
        arguments = (world_size, store.port, gpus, payload, folder, os.getpid())
        context = mp.start_processes(
            _run_rank,
            args=(*arguments, collective_timeout, interruptible),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        interrupted = False
        try:
            try:
                _wait_for(context)
            except KeyboardInterrupt:
                # As in one process, Ctrl-C ends training, not the fit: the ranks stop
                # together at the next step and keep the best weights so far. A second
                # Ctrl-C stops them at once.
                interrupted = True
                _interrupt(context.processes)
                _wait_for(context)
        except mp.ProcessRaisedException as exc:
            if interrupted:  # Ctrl-C before training, or between its parts
                raise KeyboardInterrupt from None
            raise _first_error(folder, exc) from None
        except mp.ProcessExitedException as exc:
            if interrupted:
                raise KeyboardInterrupt from None
            raise RuntimeError(
                f"rank {exc.error_index} of {world_size} died (exit code {exc.exit_code}"
                + (f", signal {exc.signal_name}" if exc.signal_name else "")
                + "), so fit stopped; the other ranks were stopped too"
            ) from None
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                process.join(timeout=10)
            del store
        result = os.path.join(folder, "result.pkl")
        if not os.path.exists(result):  # a rank ended on Ctrl-C outside training
            if interrupted:
                raise KeyboardInterrupt
            raise _first_error(folder, RuntimeError("rank 0 ended without a fitted estimator"))
        with open(result, "rb") as file:
            fitted = pickle.load(file)
    if interrupted:
        warnings.warn(
            f"training interrupted after {len(getattr(fitted, 'history_', []))} complete "
            "epoch(s); the estimator keeps the best weights so far",
            RuntimeWarning,
            stacklevel=3,
        )
    return fitted


def _wait_for(context) -> None:
    """Wait for the spawned ranks to end (raising what torch raises when one fails)."""
    while not context.join(timeout=1.0):
        pass


def _interrupt(processes) -> None:
    """Ask the ranks still running to stop training (they agree on the step)."""
    for process in processes:
        if process.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGINT)


@contextlib.contextmanager
def _ownership(folder: str):
    """Hold a lock on ``folder`` while this fit runs (released when this process ends).

    A later fit removes only folders whose lock it can take: their owner is gone,
    whatever process id namespace or machine it ran in (process ids mean nothing across
    containers sharing a temporary folder).
    """
    if fcntl is None:  # no file locks here: folders are never swept
        yield
        return
    # Locked under another name, then renamed: the lock file never exists unlocked.
    making = os.path.join(folder, _OWNER_FILE + ".new")
    with open(making, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.replace(making, os.path.join(folder, _OWNER_FILE))
        yield


def _remove_abandoned_folders() -> None:
    """Remove the shared folders of fits whose calling process is gone.

    The ranks remove their folder when the calling process dies; this catches the case
    where the ranks died with it (a whole process group killed at once). A folder whose
    lock (:func:`_ownership`) is held, or that has no lock yet, is left alone.
    """
    if fcntl is None:
        return
    root = tempfile.gettempdir()
    try:
        names = [name for name in os.listdir(root) if name.startswith(_FOLDER_PREFIX)]
    except OSError:
        return
    for name in names:
        folder = os.path.join(root, name)
        try:
            lock = open(os.path.join(folder, _OWNER_FILE))
        except OSError:  # being made, or not a fit's folder
            continue
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # its fit still runs
                continue
            shutil.rmtree(folder, ignore_errors=True)


def _remove_shared_data(folder: str) -> None:
    """Delete the copy of the data (arrays and payload) from ``folder``, keep the rest."""
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            if name.endswith(".npy") or name == _PAYLOAD:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(folder, name))


def _shareable(value, folder: str, key: str):
    """Turn a NumPy array into a memory-mapped file reference; leave the rest."""
    if isinstance(value, np.ndarray) and value.dtype != object:
        path = os.path.join(folder, f"{key}.npy")
        np.save(path, value)
        return _MappedArray(path)
    return value


@dataclass(frozen=True)
class _MappedArray:
    path: str

    def load(self) -> np.ndarray:
        return np.load(self.path, mmap_mode="r")


def _exit_with_parent(parent: int, folder: str) -> None:
    """Watch the calling process from a thread; once it is gone, clean up and exit.

    Whatever killed the parent (SIGKILL included), the ranks do not train on as
    orphans, and the shared copy of the data does not outlive them; a rank that is
    terminated (SIGTERM) removes the copy of the data too (and the whole folder when
    the parent is gone).
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        shutil.rmtree(folder, ignore_errors=True)
        os._exit(1)

    def terminate(signum, frame) -> None:
        # Terminated: by the parent, whose fit failed (it still reads the ranks' error
        # files), or with the whole process group. Either way the copy of the data goes;
        # the rest of the folder too once the parent is gone (else a later fit's sweep).
        if os.getppid() != parent:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            _remove_shared_data(folder)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    # torch's spawn asks Linux to send each rank SIGINT when the parent's thread ends:
    # the rank would take it for Ctrl-C, end its fit as interrupted and exit before
    # this thread could clean up (the parent's process can outlive that thread by a
    # moment). The watch replaces that signal.
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, 0)
    signal.signal(signal.SIGTERM, terminate)
    threading.Thread(target=watch, name="skdeep-parent-watch", daemon=True).start()


def _run_rank(
    rank: int,
    world_size: int,
    port: int,
    gpus,
    payload: str,
    folder: str,
    parent: int,
    collective_timeout: float,
    interruptible: bool = True,
) -> None:
    """Run one spawned rank: join the group, fit, and (rank 0) save the result.

    ``interruptible``: whether Ctrl-C should reach the fit (as it does the caller's).
    """
    global _active

    _exit_with_parent(parent, folder)
    if not interruptible:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with open(payload, "rb") as file:
            estimator, fit, shared = pickle.load(file)
        arguments = {
            key: value.load() if isinstance(value, _MappedArray) else value
            for key, value in shared.items()
        }
        device = torch.device("cpu")
        if gpus:
            device = torch.device("cuda", gpus[rank])
            torch.cuda.set_device(device)
        else:  # the cores are shared out among the ranks
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        timeout = datetime.timedelta(seconds=collective_timeout)
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
        dist.init_process_group(
            "nccl" if gpus else "gloo",
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timeout,
        )
        _active = DistributedContext(
            rank, world_size, device, spawned=True, timeout=collective_timeout
        )
        try:
            fitted = fit(estimator, **arguments)
            if rank == 0:
                with open(os.path.join(folder, "result.pkl"), "wb") as file:
                    pickle.dump(fitted, file)
        finally:
            _active = None
            dist.destroy_process_group()
    except BaseException as exc:
        failed_at = time.monotonic()
        with contextlib.suppress(Exception):
            with open(os.path.join(folder, f"error-{rank}.pkl"), "wb") as file:
                pickle.dump((failed_at, exc, traceback.format_exc()), file)
        raise


def _first_error(folder: str, fallback: Exception) -> Exception:
    """Return the first error a rank raised, with its traceback noted, or ``fallback``.

    The first, because the others usually follow from it: a peer that is gone breaks
    the collective every other rank waits in.
    """
    failures = []
    for name in os.listdir(folder):
        if name.startswith("error-"):
            with contextlib.suppress(Exception), open(os.path.join(folder, name), "rb") as file:
                failures.append((*pickle.load(file), int(name[6:-4])))
    if not failures:  # the error did not pickle: torch's message holds the traceback
        return RuntimeError(f"a rank of the data-parallel fit failed:\n{fallback}")
    _, error, text, rank = min(failures, key=lambda failure: failure[0])
    note = f"raised in rank {rank} of the data-parallel fit:\n{text}"
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:  # Python 3.10
        error.__cause__ = RuntimeError(note)
    return error


# ----------------------------------------------------------------------------------------
# Batch norms whose statistics are those of the global batch
# ----------------------------------------------------------------------------------------


class SynchronizedBatchNorm(nn.Module):
    """A batch norm that, in training, normalizes with the statistics of all ranks' parts.

    The same numbers a batch norm computes on the whole global batch in one process: means and
    variances combine every rank's count, mean and squared deviations, gathered in one
    collective per layer (one more in the backward pass), the running statistics (of a
    layer that keeps them) are updated with the unbiased variance of the global batch,
    with the layer's momentum (or the cumulative average when it is None). PyTorch's own
    ``nn.SyncBatchNorm`` does this on GPUs only; this one runs on any device. In eval
    mode it is the plain batch norm.

    Parameters
    ----------
    norm : BatchNorm1d, BatchNorm2d or BatchNorm3d
        The layer to synchronize; its parameters and buffers are shared, not copied.
    context : DistributedContext
        The ranks.
    """

    def __init__(self, norm: nn.Module, context: DistributedContext):
        super().__init__()
        self.norm = norm
        self.context = context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize ``x`` with the global batch's statistics (training) or the running ones."""
        norm = self.norm
        if not norm.training:
            return norm(x)
        dims = [0, *range(2, x.ndim)]
        shape = [1, -1] + [1] * (x.ndim - 2)
        values = x.float()
        # One collective forward (and one backward): every rank's count, mean and sum of
        # squared deviations, combined as Chan et al.'s parallel variance (stable, exact).
        local_mean = values.mean(dims)
        local_squares = (values - local_mean.reshape(shape)).pow(2).sum(dims)
        local_count = values.new_full((1,), values.numel() / values.shape[1])
        parts = self.context.gather(torch.cat([local_count, local_mean, local_squares])[None])
        channels = x.shape[1]
        counts, means = parts[:, :1].detach(), parts[:, 1 : 1 + channels]
        count = counts.sum()
        mean = (counts * means).sum(0) / count
        squares = parts[:, 1 + channels :] + counts * (means - mean).pow(2)
        variance = squares.sum(0) / count
        if norm.track_running_stats:
            with torch.no_grad():
                norm.num_batches_tracked += 1
                factor = (
                    1.0 / float(norm.num_batches_tracked)
                    if norm.momentum is None
                    else norm.momentum
                )
                unbiased = variance * count / max(count - 1, 1)
                norm.running_mean.mul_(1 - factor).add_(factor * mean.to(norm.running_mean.dtype))
                norm.running_var.mul_(1 - factor).add_(factor * unbiased.to(norm.running_var.dtype))
        out = (values - mean.reshape(shape)) / torch.sqrt(variance + norm.eps).reshape(shape)
        if norm.affine:
            out = out * norm.weight.reshape(shape) + norm.bias.reshape(shape)
        return out.to(x.dtype)


def synchronize_batch_norms(model: nn.Module, context: DistributedContext) -> None:
    """Replace every batch norm of ``model`` by a :class:`SynchronizedBatchNorm` around it."""
    from ._network import set_submodule

    for name, module in list(model.named_modules()):
        if isinstance(module, BatchNorm) and name:
            set_submodule(model, name, SynchronizedBatchNorm(module, context))


def unsynchronize_batch_norms(model: nn.Module) -> None:
    """Put the plain batch norms back (for a model that trains or predicts alone)."""
    from ._network import set_submodule

    for name, module in list(model.named_modules()):
        if isinstance(module, SynchronizedBatchNorm):
            set_submodule(model, name, module.norm)
