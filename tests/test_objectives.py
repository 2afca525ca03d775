"""Tests of the training objectives: supervised, and with a divergence penalty."""

import itertools

import pytest
import torch
from torch import nn

from skdeep._objectives import DivergencePenalty, Supervised, constant, ramp
from skdeep._training import Trainer, make_optimizer

CPU = torch.device("cpu")


def small_model():
    """Return a seeded two-layer perceptron."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def mean_gap(source, target):
    """Return the squared distance between the means of two samples."""
    return (source.mean(0) - target.mean(0)).pow(2).sum()


def labeled_batch(seed=0):
    """Return a batch of 16 points labeled by the sign of their first feature."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 4, generator=generator)
    return x, (x[:, 0] > 0).long()


def test_supervised_step_is_the_criterion_on_the_logits():
    """Supervised step is the criterion on the logits."""
    model = small_model()
    images, labels = labeled_batch()
    out = Supervised(nn.CrossEntropyLoss()).step(model, (images, labels), 0.0)
    expected = nn.functional.cross_entropy(model(images), labels)
    torch.testing.assert_close(out.loss, expected)
    assert out.n_labeled == 16
    assert out.n_correct == (model(images).argmax(1) == labels).sum()


def test_divergence_penalty_adds_the_weighted_divergence_of_each_layer():
    """Divergence penalty adds the weighted divergence of each layer."""
    model = small_model()
    images, labels = labeled_batch()
    target = torch.randn(16, 4) + 3
    objective = DivergencePenalty(
        nn.CrossEntropyLoss(), mean_gap, ["1", "logits"], weight=0.5, schedule=ramp,
        target_batches=iter([]), name="gap",
    )  # fmt: skip
    with objective.attach(model):
        out = objective.step(model, (images, labels, target), progress=0.3)
    hidden = model[1](model[0](torch.cat([images, target])))
    logits = model[2](hidden)
    penalty = mean_gap(hidden[:16], hidden[16:]) + mean_gap(logits[:16], logits[16:])
    expected = nn.functional.cross_entropy(logits[:16], labels) + 0.5 * ramp(0.3) * penalty
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.metrics["gap"], penalty)
    assert not model[1]._forward_hooks  # the taps are gone after training


def test_divergence_penalty_needs_attach():
    """Divergence penalty needs attach."""
    objective = DivergencePenalty(
        nn.CrossEntropyLoss(), mean_gap, ["logits"], 1.0, constant, iter([])
    )
    with pytest.raises(RuntimeError, match="attach"):
        objective.step(small_model(), (*labeled_batch(), torch.zeros(16, 4)), 0.0)


def test_a_new_method_is_one_objective():
    """CORAL (matching feature covariances) trains through the same loop, unchanged."""

    def coral(source, target):
        return (torch.cov(source.T) - torch.cov(target.T)).pow(2).sum()

    target_generator = torch.Generator().manual_seed(1)
    targets = (torch.randn(16, 4, generator=target_generator) * 3 for _ in itertools.count())

    def batches(epoch):
        for seed in range(4):
            yield labeled_batch(100 * epoch + seed)

    model = small_model()
    objective = DivergencePenalty(
        nn.CrossEntropyLoss(), coral, ["1"], 1.0, constant, targets, name="coral"
    )
    optimizer = make_optimizer("adamw", model, model[2], 0.02, 0.02, 0.0)
    trainer = Trainer(model, optimizer, None, CPU, torch.float32, max_epochs=6, steps_per_epoch=4)
    history = trainer.fit(objective, batches, 64).history
    assert history[-1]["coral"] < 0.5 * history[0]["coral"]


def test_calibration_batches_mix_the_domains():
    """Calibration batches mix the domains."""
    objective = DivergencePenalty(
        nn.CrossEntropyLoss(), mean_gap, ["logits"], 1.0, constant, iter([]),
        calibration_target_batches=lambda: iter([torch.ones(2, 4), torch.ones(2, 4)]),
    )  # fmt: skip
    mixed = list(objective.calibration_batches([torch.zeros(2, 4), torch.zeros(1, 4)]))
    assert [len(batch) for batch in mixed] == [4, 3]
    plain = Supervised(nn.CrossEntropyLoss())
    source = [torch.zeros(2, 4)]
    assert list(plain.calibration_batches(source)) == source
