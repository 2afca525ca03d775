"""The training loop shared by the fine-tuning estimators (no scikit-learn here).

The loop knows about epochs, optimizer steps, mixed precision, the learning-rate
schedule, validation, early stopping, history and interruption. What a step computes
(cross-entropy, plus an MMD penalty for domain adaptation) is the job of a training
objective (:mod:`skdeep._objectives`), so every estimator shares one loop.
"""

from __future__ import annotations

import contextlib
import copy
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ._compat import BatchNorm
from ._device import autocast, float32_depthwise_convolutions
from ._distributed import watch_collectives
from ._objectives import StepResult, Supervised
from ._progress import progress_bar

OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", None)
WARMUP_FRACTION = 0.05  # of all steps, linear warm-up before the cosine decay


@dataclass
class TrainingResult:
    """What :meth:`Trainer.fit` returns.

    One history record per epoch, the epoch whose weights the model holds, and
    whether Ctrl-C ended training.
    """

    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    interrupted: bool = False


def make_optimizer(
    name: str,
    model: nn.Module,
    head: nn.Module,
    lr: float,
    backbone_lr: float,
    weight_decay: float,
    extra: list[nn.Parameter] = (),
) -> torch.optim.Optimizer:
    """Make an optimizer with discriminative learning rates.

    ``lr`` for the new head and for ``extra`` parameters (those of a training
    objective, such as a domain classifier), ``backbone_lr`` for the pretrained
    layers. Frozen parameters are left out; biases and normalization weights (1-D
    parameters) get no weight decay.
    """
    head_ids = {id(p) for p in head.parameters()}
    head_params = [p for p in head.parameters() if p.requires_grad] + list(extra)
    body_params = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = parameter_groups(head_params, lr, weight_decay)
    groups += parameter_groups(body_params, backbone_lr, weight_decay)
    if not groups:
        raise ValueError("freeze leaves no parameter to train")
    return optimizer_of_groups(name, groups)


def parameter_groups(params: list[nn.Parameter], lr: float, weight_decay: float) -> list[dict]:
    """Split parameters into a decayed group and one without weight decay (1-D ones)."""
    groups = [
        {"params": [p for p in params if p.ndim > 1], "lr": lr, "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "lr": lr, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def optimizer_of_groups(name: str, groups: list[dict]) -> torch.optim.Optimizer:
    """Make the optimizer ``name`` ("adamw" or "sgd") over parameter groups.

    One fused kernel updates all parameters at once where the device has it; the
    per-tensor loop it replaces took a tenth of a MobileNet-V2 training step on the CPU.
    """
    if name == "sgd":
        optimizer_class, options = torch.optim.SGD, {"momentum": 0.9, "nesterov": True}
    elif name == "adamw":
        optimizer_class, options = torch.optim.AdamW, {}
    else:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}; got {name!r}")
    try:
        return optimizer_class(groups, fused=True, **options)
    except (RuntimeError, TypeError, ValueError):  # a device or dtype without the kernel
        return optimizer_class(groups, **options)


def warmup_cosine(total_steps: int) -> Callable[[int], float]:
    """Return the learning-rate factor of each step: warm-up, then cosine decay.

    Linear warm-up over the first :data:`WARMUP_FRACTION` of ``total_steps``, then
    cosine decay to zero.
    """
    warmup = max(1, round(WARMUP_FRACTION * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_scheduler(optimizer, name: str | None, total_steps: int):
    """Make the per-step learning-rate schedule (None: constant).

    ``"cosine"`` is :func:`warmup_cosine`.
    """
    if name is None:
        return None
    if name != "cosine":
        raise ValueError(f"scheduler must be one of {SCHEDULERS}; got {name!r}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps))


class WeightAverage:
    """A moving average of a model's trained parameters, updated after each optimizer step.

    After step ``t`` (from 1) of ``total`` steps, each average moves a share
    ``1 - decay(t, total)`` of the way to the parameter's new value (timm's
    ``ModelEmaV3``, parameters only). Batch-norm statistics are not averaged: they
    belong to the weights they were measured with, so the averaged network needs a
    recalibration pass (:func:`recalibrate_batch_norm`). Frozen parameters are left
    out (their average is themselves). In data-parallel training every rank holds the
    same parameters after each step (DistributedDataParallel averages the gradients),
    so every rank computes the same average.

    Parameters
    ----------
    model : nn.Module
        The network being trained; its current parameters start the average.
    decay : callable
        ``decay(t, total)``, in [0, 1]: 0 copies the parameters, 1 keeps the average.
    """

    def __init__(self, model: nn.Module, decay: Callable[[int, int], float]):
        self.decay = decay
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.averages = [p.detach().clone() for p in self.parameters]

    @torch.no_grad()
    def update(self, step: int, total: int) -> None:
        """Move the averages towards the parameters after optimizer step ``step``."""
        weight = 1.0 - float(self.decay(step, total))
        if weight == 1.0:
            torch._foreach_copy_(self.averages, [p.detach() for p in self.parameters])
        elif weight:
            torch._foreach_lerp_(self.averages, [p.detach() for p in self.parameters], weight)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the parameters and their averages (twice puts everything back)."""
        for parameter, average in zip(self.parameters, self.averages, strict=True):
            held = parameter.detach().clone()
            parameter.copy_(average)
            average.copy_(held)


@dataclass
class Trainer:
    """Runs epochs of optimizer steps with validation and early stopping.

    Parameters
    ----------
    model : nn.Module
        Trained in place; holds the best weights at the end.
    optimizer, scheduler
        From :func:`make_optimizer` and :func:`make_scheduler` (stepped per batch).
    device, dtype
        Where and in which autocast precision the steps run. float16 uses a
        gradient scaler.
    max_epochs : int
        Epochs to run at most.
    steps_per_epoch : int
        Batches per epoch, for the training progress handed to the objective.
    early_stopping : bool
        Stop when the validation loss has not improved by ``tol`` for
        ``n_iter_no_change`` epochs, and keep the weights of the best epoch.
    n_iter_no_change, tol
        See ``early_stopping``.
    frozen : list of nn.Module
        Modules kept in eval mode while training (their batch-norm statistics and
        dropout stay as they are).
    verbose : bool
        A progress bar per epoch, with the running loss, then the epoch's numbers.
    name : str
        Label of the progress bar.
    forward_model : nn.Module, optional
        What the objective runs batches through, when it is not ``model`` itself:
        ``model`` wrapped in DistributedDataParallel, which averages the gradients
        of the ranks.
    context : DistributedContext, optional
        The ranks training together: the epoch's totals are summed over them, and
        only rank 0 shows progress.
    average_decay : callable, optional
        ``average_decay(t, total)``: keep a :class:`WeightAverage` of the parameters
        with this decay. Validation (and the best epoch's snapshot) then sees the
        averaged weights, and the model ends with them (their batch-norm statistics
        still to recalibrate).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    device: torch.device
    dtype: torch.dtype
    max_epochs: int
    steps_per_epoch: int
    early_stopping: bool = False
    n_iter_no_change: int = 3
    tol: float = 1e-4
    frozen: list = field(default_factory=list)
    verbose: bool = False
    name: str = "fit"
    forward_model: nn.Module | None = None
    context: object = None
    average_decay: Callable[[int, int], float] | None = None

    def fit(
        self,
        objective: Supervised,
        epoch_batches: Callable[[int], Iterable],
        n_samples: int,
        validate: Callable[[], tuple[float, float]] | None = None,
    ) -> TrainingResult:
        """Train ``model`` on ``objective``.

        Parameters
        ----------
        objective : Supervised
            What each step minimises (see :mod:`skdeep._objectives`).
        epoch_batches : callable
            ``epoch_batches(epoch)`` yields the labeled batches ``(images, labels)``
            of one epoch; the objective may add batches of its own to each.
        n_samples : int
            Labeled images per epoch (for the progress bar).
        validate : callable, optional
            Returns ``(loss, accuracy)`` on held-out data.

        Returns
        -------
        TrainingResult
            The history, the best epoch and whether training was interrupted.
        """
        result = TrainingResult()
        self._scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self._steps_done = 0
        self._best = (math.inf, None)  # validation loss and weights of the best epoch
        self._forward = self.forward_model or self.model
        self._shows = self.verbose and (self.context is None or self.context.is_main)
        self._average = None
        if self.average_decay is not None:
            self._average = WeightAverage(self.model, self.average_decay)
        try:
            with objective.attach(self.model, self._forward), self._agreed_interrupts():
                for epoch in range(1, self.max_epochs + 1):
                    description = f"{self.name} epoch {epoch}/{self.max_epochs}"
                    with (
                        progress_bar(n_samples, description, self._shows) as bar,
                        contextlib.closing(objective.batches(epoch_batches(epoch))) as batches,
                    ):
                        # (closed even when a step fails: its reading thread ends then,
                        # though the error's traceback may keep this frame alive)
                        # (validation, below, runs the network as it will predict)
                        with float32_depthwise_convolutions(self.model, self.device, self.dtype):
                            record = self._train_epoch(objective, batches, epoch, bar)
                        if validate is not None:
                            with (
                                watch_collectives(self.context, f"the validation of epoch {epoch}"),
                                self._averaged_weights(),
                            ):
                                record["valid_loss"], record["valid_accuracy"] = validate()
                        bar.set_postfix(_summary(record), refresh=True)
                    record["lr"] = self.optimizer.param_groups[0]["lr"]
                    record["seconds"] = time.perf_counter() - record.pop("start")
                    result.history.append(record)
                    with self._averaged_weights():  # the best epoch keeps what predicts
                        stop = self._should_stop(record, result, validated=validate is not None)
                    if stop:
                        break
        except KeyboardInterrupt:
            result.interrupted = True
            warnings.warn(
                f"training interrupted after {len(result.history)} complete epoch(s); "
                "the estimator keeps the best weights so far",
                RuntimeWarning,
                stacklevel=3,
            )
        if self._best[1] is not None:
            self.model.load_state_dict(self._best[1])
        elif self._average is not None:
            self._average.swap()  # the model ends with the averaged weights
        self.model.eval()
        return result

    @contextlib.contextmanager
    def _averaged_weights(self):
        """Hold the averaged weights in the model inside the block (no average: as is)."""
        if self._average is None:
            yield
            return
        self._average.swap()
        try:
            yield
        finally:
            self._average.swap()

    @contextlib.contextmanager
    def _agreed_interrupts(self):
        """Among ranks, turn Ctrl-C into a request that every rank honours at one step.

        A rank that took Ctrl-C at once would stop at another step than the others and
        leave them waiting in a collective; instead SIGINT sets a flag, the ranks learn
        after each step whether any rank has it set, and all stop there (the loop then
        ends as one process does on Ctrl-C). Alone, or outside the main thread, Ctrl-C
        raises at once, as usual; a process that ignores Ctrl-C, or handles it itself,
        keeps doing so.
        """
        self._interrupt = threading.Event()
        if (
            self.context is None
            or threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        ):
            yield
            return
        previous = signal.signal(signal.SIGINT, lambda signum, frame: self._interrupt.set())
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _train_epoch(self, objective, batches: Iterable, epoch: int, bar) -> dict:
        """One pass over ``batches``; returns the epoch's record (losses, metrics).

        ``bar`` counts the images (of every rank) and shows the running loss.
        """
        start = time.perf_counter()
        self.model.train()
        for module in self.frozen:
            module.eval()
        totals = _EpochTotals(self.device)
        world = 1 if self.context is None else self.context.world_size
        for step, batch in enumerate(batches, 1):
            with watch_collectives(self.context, f"epoch {epoch}, step {step}"):
                out = self._optimizer_step(objective, batch)
                if self.context is not None and self.context.any(self._interrupt.is_set()):
                    raise KeyboardInterrupt  # Ctrl-C on some rank: every rank stops here
            totals.add(out)
            if self._shows:
                bar.set_postfix(loss=f"{totals.mean_loss():.4f}", refresh=False)
                bar.update(out.n_labeled * world)
        if not totals.steps:  # the data plan gives every epoch a step: never report none
            raise RuntimeError(f"epoch {epoch} took no training step")
        with watch_collectives(self.context, f"the end of epoch {epoch}"):
            summary = totals.summary(epoch, self.context)
        return {"epoch": epoch, **summary, "start": start}

    def _optimizer_step(self, objective, batch) -> StepResult:
        """Forward, backward and update for one batch (with mixed precision)."""
        progress = self._steps_done / (self.max_epochs * max(1, self.steps_per_epoch))
        with autocast(self.device, self.dtype):
            out = objective.step(self._forward, batch, progress)
        self.optimizer.zero_grad(set_to_none=True)
        self._scaler.scale(out.loss).backward()
        self._scaler.step(self.optimizer)
        self._scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        self._steps_done += 1
        if self._average is not None:
            self._average.update(self._steps_done, self.max_epochs * max(1, self.steps_per_epoch))
        return out

    def _should_stop(self, record: dict, result: TrainingResult, validated: bool) -> bool:
        """Track the best epoch; True when early stopping ends training."""
        if not (self.early_stopping and validated):
            result.best_epoch = record["epoch"]
            return False
        best_loss, _ = self._best
        if record["valid_loss"] < best_loss - self.tol:
            self._best = (record["valid_loss"], _snapshot(self.model))
            result.best_epoch = record["epoch"]
        return record["epoch"] - result.best_epoch >= self.n_iter_no_change


class _EpochTotals:
    """Running sums of one epoch, kept on the device (no sync per step)."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device)
        self.labeled = 0
        self.steps = 0
        self.metrics: dict[str, torch.Tensor] = {}

    def add(self, out: StepResult) -> None:
        self.loss += out.loss.detach().float() * out.n_labeled
        self.correct += out.n_correct
        self.labeled += out.n_labeled
        self.steps += 1
        for key, value in out.metrics.items():
            self.metrics[key] = self.metrics.get(key, 0.0) + value.detach().float()

    def mean_loss(self) -> float:
        return self.loss.item() / max(self.labeled, 1)

    def summary(self, epoch: int, context=None) -> dict:
        """Return the epoch's means, over every rank's images when ``context`` is given."""
        if context is not None:
            totals = context.sum(
                torch.stack([self.loss, self.correct.float(), torch.tensor(float(self.labeled))])
            )
            self.loss, self.correct, self.labeled = totals[0], totals[1], int(totals[2].item())
            for key, value in self.metrics.items():  # averaged over the ranks
                self.metrics[key] = context.sum(torch.as_tensor(value)) / context.world_size
        loss = self.loss.item()
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"the training loss became {loss} in epoch {epoch}; "
                "lower lr, or use precision='float32'"
            )
        summary = {
            "train_loss": loss / self.labeled,
            "train_accuracy": self.correct.item() / self.labeled,
        }
        for key, total in self.metrics.items():
            summary[key] = float(total) / self.steps
        return summary


def recalibrate_batch_norm(
    model: nn.Module,
    frozen: list[nn.Module],
    batches: Iterable[torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """Recompute the running statistics of the trained batch norms over ``batches``.

    During training, batch norms normalize with the statistics of each batch while
    their running averages (used for prediction) trail behind the changing weights;
    after few optimizer steps the two disagree and predictions suffer. One forward
    pass with exact (cumulative) averages makes them agree. Batch norms inside
    ``frozen`` modules keep their statistics. In data-parallel training each batch is
    one rank's part of a global batch (synchronized batch norms see the whole). Batch
    norms without running statistics normalize with the batch's statistics in any mode;
    they run in training mode too, so that synchronized ones see the global batch, as
    they did in training.
    """
    norms = training_batch_norms(model, frozen)
    tracked = [norm for norm in norms if norm.track_running_stats]
    if not tracked:
        return
    model.eval()
    momenta = [norm.momentum for norm in tracked]
    for norm in tracked:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over all batches
    for norm in norms:
        norm.train()
    with torch.no_grad(), autocast(device, dtype):
        for images in batches:  # the data plan's parts: each one a batch norm trains on
            model(images)
    for norm, momentum in zip(tracked, momenta, strict=True):
        norm.momentum = momentum
    model.eval()


def training_batch_norms(model: nn.Module, frozen: list[nn.Module]) -> list[nn.Module]:
    """Return the batch norms of ``model`` that train: those outside the ``frozen`` modules.

    Frozen modules stay in eval mode while training, with their batch norms.
    """
    frozen_ids = {id(inner) for module in frozen for inner in module.modules()}
    return [
        module
        for module in model.modules()
        if isinstance(module, BatchNorm) and id(module) not in frozen_ids
    ]


def _snapshot(model: nn.Module) -> dict:
    return copy.deepcopy(model.state_dict())


def _summary(record: dict) -> dict:
    """Return an epoch's numbers, shortened for a progress bar's postfix."""
    return {
        key.replace("accuracy", "acc"): f"{value:.4g}"
        for key, value in record.items()
        if key not in ("epoch", "start")
    }
