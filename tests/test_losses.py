"""Tests of the MMD losses against a NumPy reference."""

import numpy as np
import pytest
import torch

from skdeep.losses import (
    BANDWIDTH_MULTIPLIERS,
    LAPLACIAN_MULTIPLIERS,
    class_confusion_loss,
    coral,
    information_loss,
    joint_mmd,
    linear_time_mmd,
    mmd,
)


def numpy_kernel(a, b, kernel, sigmas):
    """Evaluate one kernel between two points, the textbook way."""
    if kernel == "linear":
        return float(a @ b)
    squared = float(((a - b) ** 2).sum())
    if kernel == "laplacian":
        return sum(np.exp(-np.sqrt(squared) / s) for s in sigmas)
    return sum(np.exp(-squared / (2 * s**2)) for s in sigmas)


def numpy_mmd(x, y, kernel="gaussian", sigmas=(1.0,), unbiased=True, x_labels=None, y_labels=None):
    """Compute MMD by the textbook formula, one kernel evaluation at a time.

    With label vectors, the kernel of two points is their kernel times the dot product
    of their labels (the joint MMD of features and labels).
    """
    m, n = len(x), len(y)
    x_labels = np.ones((m, 1)) if x_labels is None else x_labels
    y_labels = np.ones((n, 1)) if y_labels is None else y_labels

    def k(a, la, b, lb):
        return numpy_kernel(a, b, kernel, sigmas) * float(la @ lb)

    def mean_within(z, labels):
        size = len(z)
        total = sum(
            k(z[i], labels[i], z[j], labels[j])
            for i in range(size)
            for j in range(size)
            if i != j or not unbiased
        )
        return total / (size * (size - 1) if unbiased else size * size)

    between = sum(
        k(a, la, b, lb)
        for a, la in zip(x, x_labels, strict=True)
        for b, lb in zip(y, y_labels, strict=True)
    ) / (m * n)
    return mean_within(x, x_labels) + mean_within(y, y_labels) - 2 * between


def numpy_median_sigmas(x, y):
    """Return DAN's bandwidths around the median distance, in NumPy."""
    z = np.concatenate([x, y])
    squared = ((z[:, None] - z[None]) ** 2).sum(-1)
    # torch.median returns the lower middle value
    positive = np.sort(squared[squared > 0])
    median = positive[(len(positive) - 1) // 2]
    return [np.sqrt(median) * m for m in BANDWIDTH_MULTIPLIERS]


@pytest.fixture
def samples():
    """Return two small samples of different distributions."""
    rng = np.random.default_rng(0)
    return rng.normal(size=(7, 3)), rng.normal(0.5, 1.2, size=(9, 3))


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize(
    "kernel, bandwidths",
    [
        ("gaussian", 1.3),
        ("gaussian", [0.5, 2.0]),
        ("laplacian", 1.3),
        ("laplacian", [0.5, 2.0]),
        ("linear", None),
    ],
)
def test_mmd_matches_the_numpy_reference(samples, kernel, bandwidths, unbiased):
    """MMD matches the numpy reference."""
    x, y = samples
    sigmas = np.atleast_1d(bandwidths) if bandwidths is not None else ()
    expected = numpy_mmd(x, y, kernel, sigmas, unbiased)
    actual = mmd(torch.from_numpy(x), torch.from_numpy(y), kernel, bandwidths, unbiased)
    assert actual.item() == pytest.approx(expected, abs=1e-5)


def test_default_bandwidths_are_dans_multi_kernel_around_the_median(samples):
    """Default bandwidths are dans multi kernel around the median."""
    x, y = samples
    expected = numpy_mmd(x, y, "gaussian", numpy_median_sigmas(x, y))
    assert mmd(torch.from_numpy(x), torch.from_numpy(y)).item() == pytest.approx(expected, abs=1e-5)


def test_default_laplacian_bandwidths_are_skadas_33_around_the_median_source_distance(samples):
    """33 bandwidths 2^-8 ... 2^8 times the median distance between source rows."""
    x, y = samples
    distances = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1)).ravel()  # diagonal included
    median = np.sort(distances)[(len(distances) - 1) // 2] + 1e-7  # torch's lower middle
    sigmas = [median * m for m in LAPLACIAN_MULTIPLIERS]
    assert len(sigmas) == 33 and LAPLACIAN_MULTIPLIERS[0] == 2**-8
    expected = numpy_mmd(x, y, "laplacian", sigmas, unbiased=False)
    actual = mmd(torch.from_numpy(x), torch.from_numpy(y), "laplacian", unbiased=False)
    assert actual.item() == pytest.approx(expected, abs=1e-5)


def test_linear_time_mmd_matches_the_numpy_reference(samples):
    """Linear time MMD matches the numpy reference."""
    x, y = samples
    half = 3
    sigmas = [0.7, 1.5]
    terms = [
        numpy_kernel(x[2 * i], x[2 * i + 1], "gaussian", sigmas)
        + numpy_kernel(y[2 * i], y[2 * i + 1], "gaussian", sigmas)
        - numpy_kernel(x[2 * i], y[2 * i + 1], "gaussian", sigmas)
        - numpy_kernel(x[2 * i + 1], y[2 * i], "gaussian", sigmas)
        for i in range(half)
    ]
    actual = linear_time_mmd(torch.from_numpy(x), torch.from_numpy(y), "gaussian", sigmas)
    assert actual.item() == pytest.approx(np.mean(terms), abs=1e-5)


@pytest.mark.parametrize("estimator, n", [(mmd, 400), (linear_time_mmd, 20000)])
def test_near_zero_for_one_distribution_and_growing_with_a_mean_shift(estimator, n):
    """Near zero for one distribution and growing with a mean shift."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=generator, dtype=torch.float64)
    y = torch.randn(n, 5, generator=generator, dtype=torch.float64)
    same = estimator(x, y).item()
    shifts = [estimator(x, y + shift).item() for shift in (0.5, 1.0, 2.0)]
    assert abs(same) < 0.02
    assert same < shifts[0] < shifts[1] < shifts[2]


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_symmetric(samples, kernel):
    """Symmetric."""
    x, y = (torch.from_numpy(a) for a in samples)
    assert mmd(x, y, kernel).item() == pytest.approx(mmd(y, x, kernel).item(), abs=1e-12)


@pytest.mark.parametrize(
    "kernel, bandwidths", [("gaussian", [0.8, 1.6]), ("laplacian", [0.8, 1.6]), ("linear", None)]
)
@pytest.mark.parametrize("estimator", [mmd, linear_time_mmd])
def test_gradients_are_correct(estimator, kernel, bandwidths):
    """Gradients are correct."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    y = torch.randn(6, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: estimator(a, b, kernel=kernel, bandwidths=bandwidths), (x, y)
    )


def test_a_gradient_step_pulls_the_samples_together():
    """A gradient step pulls the samples together."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=generator, dtype=torch.float64)
    y = (torch.randn(32, 4, generator=generator, dtype=torch.float64) + 1).requires_grad_()
    before = mmd(x, y, bandwidths=1.0)
    before.backward()
    direction = y.grad / y.grad.norm()
    with torch.no_grad():
        closer = mmd(x, y - direction, bandwidths=1.0)
        farther = mmd(x, y + direction, bandwidths=1.0)
    assert closer < before < farther


def test_bad_inputs():
    """Bad inputs."""
    x = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="same number of features"):
        mmd(x, torch.zeros(4, 2))
    with pytest.raises(ValueError, match="at least 2 samples"):
        mmd(x, torch.zeros(1, 3))
    with pytest.raises(ValueError, match="kernel must be one of"):
        mmd(x, x, kernel="rbf")
    with pytest.raises(ValueError, match="bandwidths must be positive"):
        mmd(x, x, bandwidths=[1.0, -1.0])
    with pytest.raises(ValueError, match="'median'"):
        mmd(x, x, bandwidths="mean")
    with pytest.raises(ValueError, match="'median'"):
        mmd(x, x, kernel="laplacian", bandwidths="mean")


def numpy_coral(x, y):
    """Deep CORAL by the textbook formula: covariances with n - 1, Frobenius norm."""

    def covariance(z):
        centred = z - z.mean(0)
        return centred.T @ centred / (len(z) - 1)

    d = x.shape[1]
    return ((covariance(x) - covariance(y)) ** 2).sum() / (4 * d * d)


def test_coral_matches_the_numpy_reference(samples):
    """CORAL equals the textbook formula, is zero for equal samples, and has gradients."""
    x, y = (torch.from_numpy(sample) for sample in samples)
    torch.testing.assert_close(coral(x, y).item(), numpy_coral(*samples))
    assert coral(x, x).item() == 0
    assert torch.autograd.gradcheck(coral, (x.requires_grad_(), y.requires_grad_()))
    with pytest.raises(ValueError, match="at least 2 samples on each side; got 1 and"):
        coral(x[:1], y)


def test_information_loss_by_hand():
    """Mean entropy of the predictions minus the entropy of their mean, in NumPy."""
    logits = np.random.default_rng(0).normal(size=(6, 4))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    conditional = -(p * np.log(p)).sum(1).mean()
    mean = p.mean(0)
    expected = conditional + (mean * np.log(mean)).sum()
    assert information_loss(torch.from_numpy(logits)).item() == pytest.approx(expected)
    confident_diverse = torch.eye(4) * 50  # each row sure of another class: the minimum
    assert information_loss(confident_diverse).item() == pytest.approx(-np.log(4), abs=1e-6)
    collapsed = torch.tensor([[50.0, 0, 0, 0]] * 4)  # all sure of one class: no information
    assert information_loss(collapsed).item() == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match=r"logits must be 2-D"):
        information_loss(torch.zeros(3))


def test_class_confusion_loss_by_hand():
    """Minimum Class Confusion (Jin et al., 2020), written out in NumPy loops."""
    logits = np.random.default_rng(1).normal(size=(7, 3)) * 3
    temperature = 2.5
    p = np.exp(logits / temperature)
    p /= p.sum(1, keepdims=True)
    weights = 1 + np.exp((p * np.log(p)).sum(1))  # 1 + exp(-entropy)
    weights *= len(p) / weights.sum()
    confusion = np.zeros((3, 3))
    for i in range(len(p)):
        for j in range(3):
            for k in range(3):
                confusion[j, k] += weights[i] * p[i, j] * p[i, k]
    normalized = confusion / confusion.sum(0)
    expected = (normalized.sum() - np.trace(normalized)) / 3
    assert class_confusion_loss(torch.from_numpy(logits)).item() == pytest.approx(expected)


def test_class_confusion_loss_rewards_confident_diverse_batches():
    """Confident rows spread over the classes score near 0; a collapsed batch, high."""
    diverse = class_confusion_loss(torch.eye(4) * 50).item()
    unsure = class_confusion_loss(torch.zeros(4, 4)).item()
    collapsed = class_confusion_loss(torch.tensor([[50.0, 0, 0, 0]] * 4)).item()
    assert diverse == pytest.approx(0, abs=1e-6)
    assert unsure == pytest.approx(3 / 4)  # uniform rows: every column 1/4 on its diagonal
    assert collapsed > 0.7
    confident = torch.eye(4).repeat(2, 1).requires_grad_()
    loss = class_confusion_loss(confident * 2)  # gradient descent sharpens the predictions
    loss.backward()
    assert (confident.grad[confident.detach() == 1] < 0).all()
    never_predicted = torch.tensor([[1000.0, 0, 0], [0, 1000.0, 0]])  # class 2 underflows
    assert class_confusion_loss(never_predicted).item() == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match=r"logits must be 2-D"):
        class_confusion_loss(torch.zeros(3))


def class_samples(samples):
    """Return the samples with source class codes and target class probabilities (3 classes)."""
    x, y = samples
    rng = np.random.default_rng(1)
    codes = np.arange(len(x)) % 3
    probabilities = rng.dirichlet(np.ones(3), size=len(y))
    return x, y, codes, probabilities


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize(
    "kernel, bandwidths", [("gaussian", [0.5, 2.0]), ("laplacian", 1.3), ("linear", None)]
)
def test_joint_mmd_matches_the_numpy_reference(samples, kernel, bandwidths, unbiased):
    """The feature kernel times the dot product of one-hot source and soft target labels."""
    x, y, codes, probabilities = class_samples(samples)
    sigmas = np.atleast_1d(bandwidths) if bandwidths is not None else ()
    expected = numpy_mmd(x, y, kernel, sigmas, unbiased, np.eye(3)[codes], probabilities)
    actual = joint_mmd(
        torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(codes),
        torch.from_numpy(probabilities), kernel, bandwidths, unbiased,
    )  # fmt: skip
    assert actual.item() == pytest.approx(expected, abs=1e-5)


def test_joint_mmd_of_one_class_is_the_mmd(samples):
    """With a single class, the label kernel is 1: the defaults are mmd's Laplacian ones."""
    x, y = (torch.from_numpy(sample) for sample in samples)
    one_class = joint_mmd(x, y, torch.zeros(len(x), dtype=torch.long), torch.ones(len(y), 1))
    expected = mmd(x, y, "laplacian", unbiased=False)
    assert one_class.item() == pytest.approx(expected.item(), rel=1e-12)


def test_joint_mmd_sees_classes_swapped_between_domains():
    """Same features overall, each class where the other is: the MMD misses it, not the joint."""
    generator = torch.Generator().manual_seed(0)
    blob_a = torch.randn(40, 2, generator=generator, dtype=torch.float64) * 0.3
    blob_b = blob_a + 4.0
    source = torch.cat([blob_a, blob_b])
    labels = torch.cat([torch.zeros(40), torch.ones(40)]).long()
    target = torch.cat([blob_b, blob_a])  # the same rows; the classes swap places
    predicted = torch.nn.functional.one_hot(labels, 2).double()  # target: 0 at b, 1 at a
    assert mmd(source, target, "laplacian", unbiased=False).item() == pytest.approx(0, abs=1e-8)
    swapped = joint_mmd(source, target, labels, predicted)
    matched = joint_mmd(source, source, labels, predicted)
    assert matched.item() == pytest.approx(0, abs=1e-8)
    assert swapped.item() > 1.0


def test_joint_mmd_has_gradients_with_respect_to_the_features():
    """Gradients with respect to both samples' features are correct."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    y = torch.randn(5, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    codes = torch.tensor([0, 1, 1, 0, 1, 0])
    probabilities = torch.softmax(torch.randn(5, 2, generator=generator, dtype=torch.float64), 1)
    assert torch.autograd.gradcheck(
        lambda a, b: joint_mmd(a, b, codes, probabilities, bandwidths=[0.8, 1.6]), (x, y)
    )


def test_joint_mmd_bad_labels_are_named():
    """Bad labels and probabilities name the argument and what came."""
    x = torch.zeros(4, 3)
    probabilities = torch.full((4, 2), 0.5)
    with pytest.raises(ValueError, match=r"class codes from 0 to 1; got values from 0 to 2"):
        joint_mmd(x, x, torch.tensor([0, 1, 2, 0]), probabilities)
    with pytest.raises(ValueError, match=r"source_labels .* got shape \(3,\)"):
        joint_mmd(x, x, torch.tensor([0, 1, 0]), probabilities)
    with pytest.raises(ValueError, match=r"target_probabilities must have shape \(4, n_classes\)"):
        joint_mmd(x, x, torch.tensor([0, 1, 1, 0]), probabilities[:3])
    with pytest.raises(ValueError, match="kernel must be one of"):
        joint_mmd(x, x, torch.tensor([0, 1, 1, 0]), probabilities, kernel="rbf")
