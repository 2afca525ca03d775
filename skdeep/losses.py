"""Divergences between two samples of features, in torch.

- Maximum mean discrepancy (:func:`mmd`, :func:`linear_time_mmd`) measures how far apart
  two distributions are through the mean of a kernel:
  ``MMD^2 = E k(s, s') + E k(t, t') - 2 E k(s, t)``. Deep Domain Confusion (Tzeng et
  al., 2014) and the Deep Adaptation Network (Long et al., 2015) add it to the
  classification loss so that source and target features become indistinguishable.
- :func:`joint_mmd` compares the joint distributions of features and labels (target
  labels: predicted probabilities), so that each class is aligned with itself.
- :func:`coral` compares second-order statistics (Deep CORAL, Sun and Saenko, 2016).
- :func:`information_loss` asks predictions on unlabeled images to be confident and
  diverse (information maximization, as in SHOT, Liang et al., 2020);
  :func:`class_confusion_loss`, that they do not mix classes (Minimum Class Confusion,
  Jin et al., 2020).

All functions are differentiable. Gaussian bandwidths computed from the data (the
median heuristic) are treated as constants; Laplacian ones, as in skada's DAN, carry
gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: The kernels of :func:`mmd` and :func:`linear_time_mmd` (``kernel=``).
KERNELS = ("laplacian", "gaussian", "linear")
#: DAN's Gaussian family: sigma^2 = median squared distance x 2^k for k = -2..2.
BANDWIDTH_MULTIPLIERS = (0.5, 2**-0.5, 1.0, 2**0.5, 2.0)
#: skada's DAN Laplacian family: sigma = median source distance x 2^(k/2) for k/2 = -8..8.
LAPLACIAN_MULTIPLIERS = tuple(2.0 ** (k / 2 - 8) for k in range(33))


def median_bandwidths(
    squared_distances: torch.Tensor, multipliers: Sequence[float] = BANDWIDTH_MULTIPLIERS
) -> torch.Tensor:
    """Gaussian bandwidths sigma around the median pairwise distance (detached).

    Parameters
    ----------
    squared_distances : tensor
        Squared distances between the sample points (zeros on a diagonal are left out).
    multipliers : sequence of float
        Factors applied to the median distance.
    """
    values = squared_distances.detach().flatten()
    positive = values[values > 0]
    median = positive.median() if positive.numel() else values.new_tensor(1.0)
    return median.sqrt() * torch.as_tensor(multipliers, dtype=values.dtype, device=values.device)


def gaussian_kernel(squared_distances: torch.Tensor, bandwidths: torch.Tensor) -> torch.Tensor:
    """Sum over bandwidths sigma of ``exp(-d^2 / (2 sigma^2))``."""
    sigmas = bandwidths.reshape(-1, *([1] * squared_distances.ndim))
    return torch.exp(-squared_distances[None] / (2 * sigmas**2)).sum(0)


def _resolve_bandwidths(bandwidths, squared_distances: torch.Tensor) -> torch.Tensor:
    if bandwidths is None:
        return median_bandwidths(squared_distances)
    if isinstance(bandwidths, str):
        if bandwidths != "median":
            raise ValueError(
                f"bandwidths must be None, 'median' or positive numbers; got {bandwidths!r}"
            )
        return median_bandwidths(squared_distances, (1.0,))
    values = torch.as_tensor(
        bandwidths, dtype=squared_distances.dtype, device=squared_distances.device
    )
    values = values.reshape(-1)
    if not len(values) or (values <= 0).any():
        raise ValueError(f"bandwidths must be positive; got {bandwidths!r}")
    return values


def laplacian_bandwidths(source: torch.Tensor, bandwidths=None) -> torch.Tensor:
    """Laplacian bandwidths sigma: numbers as given, or around the median source distance.

    None gives :data:`LAPLACIAN_MULTIPLIERS` times the median of the distances between
    the source rows (the zero diagonal included, plus 1e-7), with gradients through the
    median, as skada's DAN computes them; "median" gives the median alone.
    """
    if bandwidths is None or (isinstance(bandwidths, str) and bandwidths == "median"):
        median = torch.cdist(source, source).median() + 1e-7
        multipliers = LAPLACIAN_MULTIPLIERS if bandwidths is None else (1.0,)
        return median * torch.as_tensor(multipliers, dtype=source.dtype, device=source.device)
    return _resolve_bandwidths(bandwidths, source)  # numbers, checked there (as other strings)


def laplacian_kernel(distances: torch.Tensor, bandwidths: torch.Tensor) -> torch.Tensor:
    """Sum over bandwidths sigma of ``exp(-d / sigma)`` (``d``: Euclidean distances)."""
    sigmas = bandwidths.reshape(-1, *([1] * distances.ndim))
    return torch.exp(-distances[None] / sigmas).sum(0)


def _check_samples(source: torch.Tensor, target: torch.Tensor, minimum: int) -> None:
    if source.ndim != 2 or target.ndim != 2 or source.shape[1] != target.shape[1]:
        raise ValueError(
            "source and target must be 2-D with the same number of features; got shapes "
            f"{tuple(source.shape)} and {tuple(target.shape)}"
        )
    if len(source) < minimum or len(target) < minimum:
        raise ValueError(
            f"the divergence needs at least {minimum} samples on each side; "
            f"got {len(source)} and {len(target)}"
        )


def mmd(
    source: torch.Tensor,
    target: torch.Tensor,
    kernel: str = "gaussian",
    bandwidths=None,
    unbiased: bool = True,
) -> torch.Tensor:
    """Squared maximum mean discrepancy between two samples (quadratic time).

    Parameters
    ----------
    source, target : tensors of shape (m, d) and (n, d)
    kernel : {"gaussian", "laplacian", "linear"}, default="gaussian"
        Gaussian kernel(s) ``exp(-d^2 / (2 sigma^2))``, Laplacian kernel(s)
        ``exp(-d / sigma)`` (the family of skada's DAN), or the linear kernel
        ``k(s, t) = s . t`` (Deep Domain Confusion), for which MMD compares the means.
    bandwidths : None, "median", float or sequence of floats, default=None
        Bandwidths sigma. None is a multi-kernel form, the kernels summed: for the
        Gaussian, DAN's five bandwidths around the median pairwise distance of the
        pooled sample (see :data:`BANDWIDTH_MULTIPLIERS`, detached); for the
        Laplacian, skada's 33 around the median distance of the source rows (see
        :func:`laplacian_bandwidths`). "median" is the single kernel at the median
        distance. Numbers are used as they are.
    unbiased : bool, default=True
        The unbiased U-statistic (leaves out the i == j terms; can be slightly
        negative), or the biased V-statistic (never negative).

    Returns
    -------
    scalar tensor
    """
    _check_samples(source, target, 2 if unbiased else 1)
    return _mmd_of_gram(_pooled_gram(source, target, kernel, bandwidths), len(source), unbiased)


def joint_mmd(
    source: torch.Tensor,
    target: torch.Tensor,
    source_labels: torch.Tensor,
    target_probabilities: torch.Tensor,
    kernel: str = "laplacian",
    bandwidths=None,
    unbiased: bool = False,
) -> torch.Tensor:
    """Squared MMD between the joint distributions of features and labels.

    The kernel of :func:`mmd` on the features times a linear kernel on the labels:
    ``k((x, l), (x', l')) = k(x, x') * (l . l')``, with ``l`` the one-hot label of a
    source row and the predicted class probabilities of a target row (the target
    has no labels). Only pairs that (are predicted to) share a class count, so the
    discrepancy compares each class's features across domains instead of the
    domains' features as a whole, as the Joint Adaptation Network does (Long et al.,
    2017, with the network's outputs as the second layer of its joint kernel). It is
    the sum over classes of the MMD between the class-weighted samples.

    Parameters
    ----------
    source, target : tensors of shape (m, d) and (n, d)
    source_labels : tensor of shape (m,)
        Class codes of the source rows, from 0 to ``n_classes - 1``.
    target_probabilities : tensor of shape (n, n_classes)
        Predicted class probabilities of the target rows, used as they are: detach
        them to treat them as pseudo-labels (:class:`skdeep.DomainAdaptedClassifier`
        does, since a gradient through them lets the network shrink the discrepancy
        by spreading its predictions).
    kernel, bandwidths, unbiased
        As in :func:`mmd`; the defaults are :class:`skdeep.DomainAdaptedClassifier`'s.

    Returns
    -------
    scalar tensor
    """
    _check_samples(source, target, 2 if unbiased else 1)
    m, n = len(source), len(target)
    if target_probabilities.ndim != 2 or target_probabilities.shape[0] != n:
        raise ValueError(
            f"target_probabilities must have shape ({n}, n_classes) for {n} target rows; "
            f"got {tuple(target_probabilities.shape)}"
        )
    n_classes = target_probabilities.shape[1]
    expected = f"source_labels must hold {m} class codes from 0 to {n_classes - 1}"
    if source_labels.shape != (m,):
        raise ValueError(f"{expected}; got shape {tuple(source_labels.shape)}")
    # The range is checked where it costs nothing: on an accelerator, reading the codes
    # would wait for the device at every training step (one_hot checks there instead).
    if (
        source_labels.device.type == "cpu"
        and not 0 <= source_labels.min() <= source_labels.max() < n_classes
    ):
        raise ValueError(
            f"{expected}; got values from {source_labels.min().item()} to "
            f"{source_labels.max().item()}"
        )
    one_hot = torch.nn.functional.one_hot(source_labels.long(), n_classes)
    labels = torch.cat([one_hot.to(target_probabilities.dtype), target_probabilities])
    gram = _pooled_gram(source, target, kernel, bandwidths) * (labels @ labels.T)
    return _mmd_of_gram(gram, m, unbiased)


def _pooled_gram(source, target, kernel: str, bandwidths) -> torch.Tensor:
    """Kernel matrix of the rows of ``source`` followed by those of ``target``."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}; got {kernel!r}")
    pooled = torch.cat([source, target])
    if kernel == "linear":
        return pooled @ pooled.T
    if kernel == "laplacian":
        distances = torch.cdist(pooled, pooled)
        return laplacian_kernel(distances, laplacian_bandwidths(source, bandwidths))
    squared = torch.cdist(pooled, pooled).pow(2)
    return gaussian_kernel(squared, _resolve_bandwidths(bandwidths, squared))


def _mmd_of_gram(gram: torch.Tensor, m: int, unbiased: bool) -> torch.Tensor:
    """MMD^2 from the pooled kernel matrix whose first ``m`` rows are the source's."""
    k_ss, k_tt, k_st = gram[:m, :m], gram[m:, m:], gram[:m, m:]
    if unbiased:
        n = len(gram) - m
        within_source = (k_ss.sum() - k_ss.diagonal().sum()) / (m * (m - 1))
        within_target = (k_tt.sum() - k_tt.diagonal().sum()) / (n * (n - 1))
    else:
        within_source, within_target = k_ss.mean(), k_tt.mean()
    return within_source + within_target - 2 * k_st.mean()


def linear_time_mmd(
    source: torch.Tensor,
    target: torch.Tensor,
    kernel: str = "gaussian",
    bandwidths=None,
) -> torch.Tensor:
    """Unbiased linear-time estimate of the squared MMD (Gretton et al., 2012).

    Uses the first ``2 * (min(m, n) // 2)`` rows of each sample, in pairs:
    ``h_i = k(s_2i, s_2i+1) + k(t_2i, t_2i+1) - k(s_2i, t_2i+1) - k(s_2i+1, t_2i)``,
    averaged. Cost and memory grow linearly with the batch, at the price of more
    variance than :func:`mmd`. With ``bandwidths=None`` the median is taken over
    the distances this estimator uses.

    Parameters
    ----------
    source, target, kernel, bandwidths
        As in :func:`mmd`.

    Returns
    -------
    scalar tensor
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}; got {kernel!r}")
    _check_samples(source, target, 2)
    half = min(len(source), len(target)) // 2
    s1, s2 = source[0 : 2 * half : 2], source[1 : 2 * half : 2]
    t1, t2 = target[0 : 2 * half : 2], target[1 : 2 * half : 2]
    pairs = [(s1, s2), (t1, t2), (s1, t2), (s2, t1)]
    if kernel == "linear":
        values = [(a * b).sum(1) for a, b in pairs]
    elif kernel == "laplacian":
        sigmas = laplacian_bandwidths(source, bandwidths)
        values = [laplacian_kernel((a - b).norm(dim=1), sigmas) for a, b in pairs]
    else:
        squared = [(a - b).pow(2).sum(1) for a, b in pairs]
        sigmas = _resolve_bandwidths(bandwidths, torch.cat(squared))
        values = [gaussian_kernel(d, sigmas) for d in squared]
    return (values[0] + values[1] - values[2] - values[3]).mean()


def coral(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Deep CORAL's loss: the distance between the two samples' feature covariances.

    ``||C_s - C_t||_F^2 / (4 d^2)`` with ``C`` the unbiased covariance of the ``d``
    features (Sun and Saenko, 2016).

    Parameters
    ----------
    source, target : tensors of shape (m, d) and (n, d)

    Returns
    -------
    scalar tensor
    """
    _check_samples(source, target, 2)
    width = source.shape[1]
    gap = torch.cov(source.T) - torch.cov(target.T)
    return gap.pow(2).sum() / (4 * width * width)


def information_loss(logits: torch.Tensor) -> torch.Tensor:
    """Minus the mutual information between images and predicted classes, on a batch.

    ``mean_i H(p_i) - H(mean_i p_i)`` with ``p_i`` the softmax of row i and ``H`` the
    entropy (in nats): low when each prediction is confident (first term) and the
    batch's predictions spread over the classes (second term), which keeps the first
    from collapsing onto one class (Krause et al., 2010; Liang et al., 2020).

    Parameters
    ----------
    logits : tensor of shape (n, n_classes)

    Returns
    -------
    scalar tensor
    """
    if logits.ndim != 2 or len(logits) < 1:
        raise ValueError(f"logits must be 2-D (n, n_classes); got shape {tuple(logits.shape)}")
    log_p = torch.log_softmax(logits.float(), dim=1)
    p = log_p.exp()
    conditional = -(p * log_p).sum(1).mean()
    mean = p.mean(0)
    marginal = -(mean * torch.log(mean.clamp_min(1e-12))).sum()
    return conditional - marginal


def class_confusion_loss(logits: torch.Tensor, temperature: float = 2.5) -> torch.Tensor:
    """Minimum Class Confusion: how often a batch's predictions mix two classes.

    With ``p`` the softmax of ``logits / temperature``, rows weighted by
    ``1 + exp(-H(p_i))`` (confident rows count more; the weights, detached, are scaled
    to sum to the batch size), the class confusion matrix ``C = p^T diag(w) p`` is
    normalized so that each column sums to 1, and the loss is the mean over classes of
    the mass off the diagonal (Jin et al., 2020). It is low when each row is confident
    and different rows go to different classes; a batch collapsed onto one class
    scores high, since every other class's column then holds mostly its confusion
    with that class.

    Parameters
    ----------
    logits : tensor of shape (n, n_classes)
    temperature : float, default=2.5
        Softmax temperature (the paper's).

    Returns
    -------
    scalar tensor
    """
    if logits.ndim != 2 or len(logits) < 1:
        raise ValueError(f"logits must be 2-D (n, n_classes); got shape {tuple(logits.shape)}")
    p = torch.softmax(logits.float() / temperature, dim=1)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(1).detach()
    weights = 1 + torch.exp(-entropy)
    weights = len(p) * weights / weights.sum()
    confusion = (p * weights[:, None]).T @ p
    # A class that no row gives any probability (softmax underflow) has an empty
    # column: it holds no confusion, and must not divide by zero.
    confusion = confusion / confusion.sum(0, keepdim=True).clamp_min(1e-12)
    n_classes = p.shape[1]
    return (confusion.sum() - confusion.trace()) / n_classes
