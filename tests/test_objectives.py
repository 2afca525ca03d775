"""Tests of the training objectives: supervised, and with a divergence penalty."""

import itertools

import pytest
import torch
from torch import nn

from skdeep._objectives import (
    AdversarialPenalty,
    DivergencePenalty,
    GradientReversal,
    JointDivergencePenalty,
    Supervised,
    constant,
    domain_classifier,
    ramp,
)
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


def test_joint_penalty_gives_the_divergence_source_labels_and_detached_predictions():
    """The joint divergence sees the labels and the target's class probabilities, detached."""
    model = small_model()
    images, labels = labeled_batch()
    target = torch.randn(16, 4) + 3
    seen = {}

    def divergence(source_rows, target_rows, source_labels, target_probabilities):
        seen.update(labels=source_labels, probabilities=target_probabilities)
        return mean_gap(source_rows, target_rows)

    objective = JointDivergencePenalty(
        nn.CrossEntropyLoss(), divergence, ["1"], weight=0.5, schedule=constant,
        target_batches=iter([]),
    )  # fmt: skip
    with objective.attach(model):
        out = objective.step(model, (images, labels, target), progress=0.3)
    hidden = model[1](model[0](torch.cat([images, target])))
    logits = model[2](hidden)
    torch.testing.assert_close(seen["labels"], labels)
    torch.testing.assert_close(seen["probabilities"], torch.softmax(logits[16:], 1))
    # Pseudo-labels: no gradient may reach the network through the predictions.
    assert not seen["probabilities"].requires_grad
    expected = nn.functional.cross_entropy(logits[:16], labels) + 0.5 * mean_gap(
        hidden[:16], hidden[16:]
    )
    torch.testing.assert_close(out.loss, expected)
    assert "joint_mmd" in out.metrics


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


def test_calibration_batches_mix_the_domains_or_take_the_target():
    """Calibration batches mix the domains, or hold the target alone."""
    objective = DivergencePenalty(
        nn.CrossEntropyLoss(), mean_gap, ["logits"], 1.0, constant, iter([]),
        calibration_target_batches=lambda: iter([torch.ones(2, 4), torch.ones(2, 4)]),
    )  # fmt: skip
    mixed = list(objective.calibration_batches([torch.zeros(2, 4), torch.zeros(1, 4)]))
    assert [len(batch) for batch in mixed] == [4, 3]
    objective.calibrate_on = "target"
    target_only = list(objective.calibration_batches([torch.zeros(2, 4)]))
    assert [batch.sum().item() for batch in target_only] == [8, 8]
    plain = Supervised(nn.CrossEntropyLoss())
    source = [torch.zeros(2, 4)]
    assert list(plain.calibration_batches(source)) == source


def batch_norm_model():
    """Return a seeded perceptron with a batch norm between its layers."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def test_separate_passes_normalize_each_domain_with_its_own_statistics():
    """With separate passes, batch norm sees each domain alone (no joint statistics)."""
    model = batch_norm_model().train()
    images, _ = labeled_batch()
    target = torch.randn(16, 4) * 4 + 3
    for separate in (False, True):
        objective = DivergencePenalty(
            nn.CrossEntropyLoss(), mean_gap, ["1"], 1.0, constant, iter([]),
            separate_passes=separate,
        )  # fmt: skip
        with objective.attach(model):
            source_rows, target_rows = objective.features(images, target)
        normalized = source_rows["1"]
        # Per-domain statistics: the source rows have zero mean, whatever the target.
        assert torch.allclose(normalized.mean(0), torch.zeros(8), atol=1e-5) is separate
        assert target_rows["1"].shape == (16, 8)


def test_gradient_reversal_is_the_identity_forward_and_flips_gradients():
    """GRL: the same values forward, ``-coefficient`` times the gradient backward."""
    x = torch.randn(5, 3, requires_grad=True)
    y = GradientReversal.apply(x, 0.7)
    torch.testing.assert_close(y, x)
    (y * torch.arange(3.0)).sum().backward()
    torch.testing.assert_close(x.grad, -0.7 * torch.arange(3.0).expand(5, 3))


def test_adversarial_loss_is_the_domain_cross_entropy_behind_a_reversal():
    """The loss is CE + BCE(domain) behind a gradient reversal.

    The network gets the reversed gradient, the domain classifier the plain one (a
    closed-form check on a linear classifier).
    """
    model = small_model()
    images, labels = labeled_batch()
    target = torch.randn(16, 4) + 2
    classifier = nn.Linear(8, 1)
    objective = AdversarialPenalty(
        nn.CrossEntropyLoss(), classifier, ["1"], weight=0.5, schedule=constant,
        target_batches=iter([]),
    )  # fmt: skip
    with objective.attach(model):
        out = objective.step(model, (images, labels, target), progress=0.0)
    hidden = model[1](model[0](torch.cat([images, target])))
    domains = torch.cat([torch.zeros(16), torch.ones(16)])
    logit = classifier(hidden).squeeze(1)
    bce = nn.functional.binary_cross_entropy_with_logits(logit, domains)
    expected = nn.functional.cross_entropy(model[2](hidden[:16]), labels) + bce
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.metrics["adversarial"], bce)
    out.loss.backward()
    # d BCE / d logit = (sigmoid(logit) - domain) / 32; the classifier's weight gradient:
    residual = (torch.sigmoid(logit) - domains).detach() / 32
    torch.testing.assert_close(classifier.weight.grad[0], residual @ hidden.detach())
    assert objective.parameters() == list(classifier.parameters())


def test_adversarial_training_shrinks_what_tells_the_domains_apart():
    """Features trained against a domain classifier are harder to tell apart."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    def train(weight):
        model = small_model()
        classifier = domain_classifier(8, hidden=16)
        generator = torch.Generator().manual_seed(1)
        targets = (torch.randn(16, 4, generator=generator) + 1.5 for _ in itertools.count())
        objective = AdversarialPenalty(
            nn.CrossEntropyLoss(), classifier, ["1"], weight, constant, targets
        )
        optimizer = make_optimizer(
            "adamw", model, model[2], 0.01, 0.01, 0.0, objective.parameters()
        )
        trainer = Trainer(model, optimizer, None, CPU, torch.float32, max_epochs=30,
                          steps_per_epoch=4)  # fmt: skip
        trainer.fit(objective, lambda epoch: (labeled_batch(100 * epoch + s) for s in range(4)), 64)
        with torch.no_grad():
            source = model[1](model[0](torch.randn(200, 4)))
            target = model[1](model[0](torch.randn(200, 4) + 1.5))
        features = torch.cat([source, target]).numpy()
        domains = [0] * 200 + [1] * 200
        return cross_val_score(LogisticRegression(max_iter=500), features, domains).mean()

    without, weak, strong = train(0.0), train(1.0), train(3.0)
    assert strong < weak < without and strong < without - 0.1


@pytest.mark.parametrize(
    ("option", "name", "loss_name"),
    [
        ("information_weight", "information", "information_loss"),
        ("class_confusion_weight", "class_confusion", "class_confusion_loss"),
    ],
)
def test_prediction_term_on_the_target_logits(option, name, loss_name):
    """With a prediction term's weight, the loss adds its scheduled share of the term."""
    import skdeep.losses

    model = small_model()
    images, labels = labeled_batch()
    target = torch.randn(16, 4) + 3
    plain = DivergencePenalty(nn.CrossEntropyLoss(), mean_gap, ["1"], 1.0, ramp, iter([]))
    termed = DivergencePenalty(
        nn.CrossEntropyLoss(), mean_gap, ["1"], 1.0, ramp, iter([]), **{option: 0.3}
    )
    losses = []
    for objective in (plain, termed):
        with objective.attach(model):
            losses.append(objective.step(model, (images, labels, target), progress=0.4))
    expected = getattr(skdeep.losses, loss_name)(model(target))
    torch.testing.assert_close(losses[1].loss - losses[0].loss, 0.3 * ramp(0.4) * expected)
    torch.testing.assert_close(losses[1].metrics[name], expected)
    assert name not in losses[0].metrics
