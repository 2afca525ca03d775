"""Tests of the training loop: optimizer groups, schedule, early stopping, recalibration."""

import itertools
import math

import pytest
import torch
from torch import nn

from skdeep._objectives import StepResult, Supervised
from skdeep._training import Trainer, make_optimizer, make_scheduler, recalibrate_batch_norm

CPU = torch.device("cpu")


def small_model():
    """Return a seeded perceptron with a batch norm."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def test_discriminative_learning_rates_and_no_decay_on_1d_parameters():
    """Discriminative learning rates and no decay on 1d parameters."""
    model = small_model()
    optimizer = make_optimizer("sgd", model, model[3], lr=0.1, backbone_lr=0.01, weight_decay=0.5)
    by_id = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    assert by_id[id(model[3].weight)]["lr"] == 0.1
    assert by_id[id(model[0].weight)]["lr"] == 0.01
    assert by_id[id(model[0].weight)]["weight_decay"] == 0.5
    assert by_id[id(model[0].bias)]["weight_decay"] == 0.0
    assert by_id[id(model[1].weight)]["weight_decay"] == 0.0
    model[0].requires_grad_(False)
    optimizer = make_optimizer("adamw", model, model[3], 0.1, 0.01, 0.0)
    assert id(model[0].weight) not in {id(p) for g in optimizer.param_groups for p in g["params"]}
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter to train"):
        make_optimizer("adamw", model, model[3], 0.1, 0.01, 0.0)


def test_cosine_schedule_warms_up_then_decays_to_zero():
    """Cosine schedule warms up then decays to zero."""
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = make_scheduler(optimizer, "cosine", total_steps=100)
    rates = []
    for _ in range(100):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(0.2)  # 5 warm-up steps
    assert rates[4] == pytest.approx(1.0)
    assert rates[50] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 95)))
    assert rates[-1] < 0.01 and all(a >= b for a, b in itertools.pairwise(rates[4:]))
    assert make_scheduler(optimizer, None, 100) is None


def regression_batches(epoch):
    """Yield four labeled batches of one epoch."""
    generator = torch.Generator().manual_seed(epoch)
    for _ in range(4):
        x = torch.randn(16, 4, generator=generator)
        yield x, (x[:, 0] > 0).long()


def make_trainer(model, **kwargs):
    """Return a Trainer with AdamW over five epochs of four steps."""
    optimizer = make_optimizer("adamw", model, model[3], 0.05, 0.05, 0.0)
    defaults = dict(device=CPU, dtype=torch.float32, max_epochs=5, steps_per_epoch=4)
    return Trainer(model, optimizer, None, **{**defaults, **kwargs})


SUPERVISED = Supervised(nn.CrossEntropyLoss())


def test_trainer_records_history_and_learns():
    """Trainer records history and learns."""
    model = small_model()
    result = make_trainer(model).fit(SUPERVISED, regression_batches, 64)
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4, 5]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert {"train_loss", "train_accuracy", "lr", "seconds"} <= set(result.history[0])
    assert not model.training


def test_early_stopping_restores_the_best_weights():
    """Early stopping restores the best weights."""
    model = small_model()
    losses = iter([0.5, 0.4, 0.45, 0.46, 0.47, 0.3])
    snapshots = {}

    def validate():
        snapshots[len(snapshots) + 1] = {k: v.clone() for k, v in model.state_dict().items()}
        return next(losses), 0.0

    trainer = make_trainer(model, max_epochs=6, early_stopping=True, n_iter_no_change=3)
    result = trainer.fit(SUPERVISED, regression_batches, 64, validate)
    assert len(result.history) == 5 and result.best_epoch == 2
    for key, value in model.state_dict().items():
        assert torch.equal(value, snapshots[2][key])


def test_interrupt_keeps_the_best_weights_so_far():
    """Interrupt keeps the best weights so far."""
    model = small_model()

    def batches(epoch):
        if epoch == 3:
            raise KeyboardInterrupt
        yield from regression_batches(epoch)

    with pytest.warns(RuntimeWarning, match="interrupted after 2 complete epoch"):
        result = make_trainer(model).fit(SUPERVISED, batches, 64)
    assert result.interrupted and result.best_epoch == 2


def test_non_finite_loss_is_an_error():
    """Non finite loss is an error."""
    model = small_model()

    class Diverging(Supervised):
        def step(self, model, batch, progress):
            out = super().step(model, batch, progress)
            return StepResult(out.loss * float("nan"), out.n_correct, out.n_labeled)

    with pytest.raises(FloatingPointError, match="training loss became nan"):
        make_trainer(model).fit(Diverging(nn.CrossEntropyLoss()), regression_batches, 64)


def test_batch_norm_recalibration_uses_exact_statistics():
    """Batch norm recalibration uses exact statistics."""
    model = small_model()
    data = torch.randn(64, 4) * 3 + 1
    recalibrate_batch_norm(model, [], [data[:32], data[32:]], CPU, torch.float32)
    hidden = model[0](data)
    torch.testing.assert_close(model[1].running_mean, hidden.mean(0), atol=1e-5, rtol=1e-5)
    assert model[1].momentum == 0.1 and not model.training
    frozen_model = small_model()
    before = frozen_model[1].running_mean.clone()
    recalibrate_batch_norm(frozen_model, [frozen_model[1]], [data], CPU, torch.float32)
    assert torch.equal(frozen_model[1].running_mean, before)


class RecordingSupervised(Supervised):
    """Supervised, keeping a copy of the trained parameters as each step finds them."""

    def __init__(self):
        super().__init__(nn.CrossEntropyLoss())
        self.trajectory = []

    def step(self, model, batch, progress):
        """Record the parameters, then take the supervised step."""
        self.trajectory.append([p.detach().double().numpy().copy() for p in model.parameters()])
        return super().step(model, batch, progress)


def decay_rule(t, total):
    """Return the mean of all steps so far while it decays less than 0.8, then 0.8."""
    return min(0.8, 1.0 - 1.0 / t)


def test_weight_average_equals_a_numpy_reference_of_its_update():
    """The model ends with a NumPy reference of the average of its steps' parameters."""
    import numpy as np

    plain, recorder = small_model(), RecordingSupervised()
    make_trainer(plain).fit(recorder, regression_batches, 64)
    steps = [*recorder.trajectory[1:], [p.detach().double().numpy() for p in plain.parameters()]]
    assert len(steps) == 5 * 4
    expected = [p.copy() for p in recorder.trajectory[0]]
    for t, parameters in enumerate(steps, 1):
        weight = 1.0 - decay_rule(t, len(steps))
        expected = [a + weight * (p - a) for a, p in zip(expected, parameters, strict=True)]
    averaged = small_model()
    make_trainer(averaged, average_decay=decay_rule).fit(SUPERVISED, regression_batches, 64)
    for got, want in zip(averaged.parameters(), expected, strict=True):
        np.testing.assert_allclose(got.detach().double().numpy(), want, rtol=1e-5, atol=1e-6)
    # The average differs from the last weights; batch-norm statistics are not averaged.
    assert not torch.allclose(averaged[0].weight, plain[0].weight)
    torch.testing.assert_close(averaged[1].running_mean, plain[1].running_mean)
    # A decay of 0 copies the weights: the same model as without an average.
    copied = small_model()
    make_trainer(copied, average_decay=lambda t, total: 0.0).fit(SUPERVISED, regression_batches, 64)
    for got, want in zip(copied.state_dict().values(), plain.state_dict().values(), strict=True):
        assert torch.equal(got, want)


def test_weight_average_leaves_frozen_parameters_and_is_what_validation_sees():
    """Frozen parameters stay; validation and the best epoch see the averaged weights."""
    model = small_model()
    model[0].requires_grad_(False)
    frozen = model[0].weight.clone()
    trainer = make_trainer(model, average_decay=decay_rule, early_stopping=True, max_epochs=3)
    seen = []
    losses = iter([0.5, 0.4, 0.45])

    def validate():
        seen.append(model[3].weight.detach().clone())
        return next(losses), 0.0

    result = trainer.fit(SUPERVISED, regression_batches, 64, validate)
    assert result.best_epoch == 2
    assert torch.equal(model[0].weight, frozen)
    assert len(trainer._average.parameters) == 4  # the two trained layers' weights and biases
    # The model holds the average as validation saw it at the best epoch, not the last one.
    assert torch.equal(model[3].weight, seen[1])
    assert not torch.equal(seen[1], seen[2])
