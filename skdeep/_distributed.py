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
operating system picks (nothing can take it in between); every rank watches its parent
and, when the parent is gone (killed, even by SIGKILL), removes the shared temporary
folder and exits; a collective that does not complete within ``collective_timeout``
seconds raises on the ranks that wait, naming the rank and the step.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import pickle
import re
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ._compat import BatchNorm

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_FOLDER_PREFIX = "skdeep-ranks-"  # then the parent's process id and a dash
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
    timeout : float
        Seconds a collective waits for the other ranks (for error messages).
    """

    rank: int
    world_size: int
    device: torch.device
    spawned: bool = False
    timeout: float = 300.0

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the one that prints and writes."""
        return self.rank == 0

    def broadcast_int(self, value: int) -> int:
        """Return rank 0's ``value`` on every rank."""
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.broadcast(tensor, 0)
        return int(tensor.item())

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
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout)
        )
    return DistributedContext(dist.get_rank(), dist.get_world_size(), device, timeout=timeout)


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
        reason = (
            f"did not complete within collective_timeout={context.timeout:g} s (another "
            "process hangs, or is slower than that)"
            if timed_out
            else "failed (another process died or raised)"
        )
        raise RuntimeError(
            f"rank {context.rank} of {context.world_size}: a collective at {where} "
            f"{reason}: {text.strip().splitlines()[0] if text.strip() else type(exc).__name__}"
        ) from exc


# What a collective's failure says when PyTorch raises it as a plain RuntimeError (the
# gradient averaging of DistributedDataParallel, inside backward).
_COLLECTIVE_FAILURE = re.compile(
    r"gloo|nccl|timed out|connection (closed|reset)|peer|ProcessGroup", re.IGNORECASE
)


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
    with tempfile.TemporaryDirectory(prefix=prefix) as folder:
        shared = {key: _shareable(value, folder, key) for key, value in arguments.items()}
        payload = os.path.join(folder, "payload.pkl")
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
        context = mp.start_processes(
            _run_rank,
            args=(world_size, store.port, gpus, payload, folder, os.getpid(), collective_timeout),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        try:
            while not context.join(timeout=1.0):
                pass
        except mp.ProcessRaisedException as exc:
            raise _first_error(folder, exc) from None
        except mp.ProcessExitedException as exc:
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
        with open(os.path.join(folder, "result.pkl"), "rb") as file:
            return pickle.load(file)


def _remove_abandoned_folders() -> None:
    """Remove the shared folders of fits whose calling process no longer exists.

    The ranks remove their folder when the calling process dies; this catches the case
    where the ranks died with it (a whole process group killed at once).
    """
    pattern = re.compile(re.escape(_FOLDER_PREFIX) + r"(\d+)-")
    root = tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for name in os.listdir(root):
            match = pattern.match(name)
            if match and not _process_exists(int(match[1])):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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
    orphans, and the shared copy of the data does not outlive them.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        shutil.rmtree(folder, ignore_errors=True)
        os._exit(1)

    # torch's spawn asks Linux to send each rank SIGINT when the parent's thread ends:
    # the rank would take it for Ctrl-C, end its fit as interrupted and exit before
    # this thread could clean up (the parent's process can outlive that thread by a
    # moment). The watch replaces that signal.
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, 0)
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
) -> None:
    """Run one spawned rank: join the group, fit, and (rank 0) save the result."""
    global _active

    _exit_with_parent(parent, folder)
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
    collective per layer (one more in the backward pass), the running statistics are updated
    with the unbiased variance of the global batch, with the layer's momentum (or the
    cumulative average when it is None). PyTorch's own ``nn.SyncBatchNorm`` does this on
    GPUs only; this one runs on any device. In eval mode it is the plain batch norm.

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
        if not norm.training or not norm.track_running_stats:
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
        with torch.no_grad():
            norm.num_batches_tracked += 1
            factor = (
                1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
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
