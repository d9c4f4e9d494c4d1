"""Multi-kernel maximum mean discrepancy (MK-MMD, as in DAN / JAN) between two samples.

A Gaussian kernel ``k(x, y) = exp(-||x - y||^2 / (m * h))`` is summed over bandwidth
multipliers ``m`` (default 0.25, 0.5, 1, 2, 4), where ``h`` is the median squared pairwise
distance of the pooled source + target sample (the "median heuristic"), detached from the
graph. Taking ``h`` from the batch makes the loss invariant to a common rescaling of the
features, so the encoder cannot lower it by shrinking every feature towards zero.

Two estimators of ``MMD^2`` are offered:

* ``unbiased`` (default): the U-statistic, the diagonal ``k(x_i, x_i)`` left out. Its
  expectation is exactly 0 when both samples come from one distribution, so it does not pull
  on features that are already aligned; a value can be slightly negative (noise around 0) and
  is not clamped (a clamp would cut the gradient off there).
* ``biased``: the V-statistic (diagonal included); always >= 0 but biased upwards by about
  ``1/n + 1/m`` minus the within-sample similarity, and its gradient also pushes each sample
  apart within itself.

A joint kernel over several views of one sample (JMMD) is the elementwise product of their
kernel matrices; :func:`mmd_from_kernel` takes any such matrix.

Every estimator takes optional ``source_weights [n]``: the source sample then stands for the
reweighted distribution ``w(x) p_s(x)`` (weighted MMD, as in "Mind the class weight bias",
Yan et al. 2017). :func:`size_shift_weights` builds such weights from box sizes, so that
alignment compares target pairs with source pairs of target-like box sizes instead of pulling
the target's boxes to the source's sizes.
"""
from __future__ import annotations

from typing import Sequence

import torch

DEFAULT_MULTIPLIERS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
ESTIMATORS = ("unbiased", "biased")


def median_sq_distance(sq_dist: torch.Tensor) -> torch.Tensor:
    """Median of the off-diagonal entries of a square ``[N, N]`` squared-distance matrix
    (a detached scalar, floored so that identical samples do not divide by zero)."""
    n = sq_dist.shape[0]
    off = sq_dist.detach()[~torch.eye(n, dtype=torch.bool, device=sq_dist.device)]
    if off.numel() == 0:
        return sq_dist.new_tensor(1.0)
    return off.median().clamp_min(1e-8)


def gaussian_kernel_matrix(
    z: torch.Tensor, multipliers: Sequence[float] = DEFAULT_MULTIPLIERS
) -> torch.Tensor:
    """Multi-bandwidth Gaussian kernel of the pooled sample ``z [N, F]`` -> ``[N, N]``.

    The kernels are averaged (not summed) over the multipliers so that ``k(x, x) = 1``
    whatever their number; this only rescales the MMD by a constant.
    """
    if z.ndim != 2:
        raise ValueError(f"gaussian_kernel_matrix expects [N, F] samples, got shape {tuple(z.shape)}")
    if len(multipliers) == 0:
        raise ValueError("at least one bandwidth multiplier is needed")
    # Always float32, also under bf16/fp16 autocast: the Gram-matrix trick below subtracts
    # large nearly equal numbers, which a 8-bit mantissa turns into noise.
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = z.float()
        # ||a-b||^2 via the Gram matrix: O(N^2 F) and one matmul; clamp the float error below 0.
        sq_norm = (z * z).sum(dim=1)
        sq_dist = (sq_norm[:, None] + sq_norm[None, :] - 2.0 * z @ z.T).clamp_min(0.0)
        base = median_sq_distance(sq_dist)
        kernel = torch.zeros_like(sq_dist)
        for m in multipliers:
            if m <= 0:
                raise ValueError(f"bandwidth multipliers must be > 0, got {m}")
            kernel = kernel + torch.exp(-sq_dist / (float(m) * base))
    return kernel / len(multipliers)


def mmd_from_kernel(kernel: torch.Tensor, n_source: int, estimator: str = "unbiased",
                    source_weights: torch.Tensor | None = None) -> torch.Tensor:
    """``MMD^2`` from the kernel matrix of the pooled sample (source rows first).

    Args:
        kernel: ``[N, N]``, rows/columns ``0..n_source-1`` are the source sample, the rest the target.
        n_source: size of the source sample.
        estimator: ``unbiased`` (U-statistic) or ``biased`` (V-statistic); see the module doc.
        source_weights: optional ``[n_source]`` non-negative importance weights of the source
            samples (any scale; treated as constants). None: all equal.
    Returns:
        A scalar tensor.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown MMD estimator {estimator!r}; choose one of {ESTIMATORS}")
    n = n_source
    m = kernel.shape[0] - n_source
    if n < 2 or m < 2:
        raise ValueError(f"MMD needs at least 2 samples per domain, got {n} source and {m} target")
    k_ss = kernel[:n, :n]
    k_tt = kernel[n:, n:]
    k_st = kernel[:n, n:]
    if estimator == "unbiased":
        within_t = (k_tt.sum() - k_tt.diagonal().sum()) / (m * (m - 1))
    else:
        within_t = k_tt.mean()
    if source_weights is None:
        w = kernel.new_full((n,), 1.0 / n)  # equal weights: the plain estimators
    else:
        w = source_weights.detach().to(kernel.dtype).reshape(-1)
        if w.shape[0] != n or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError(f"source_weights must be {n} non-negative numbers with a positive sum")
        w = w / w.sum()  # a probability vector over the source sample
    pair = w[:, None] * w[None, :]
    if estimator == "unbiased":
        # the (weighted) U-statistic: pairs i != j only, renormalised over them; with equal
        # weights it is (sum - trace) / (n (n - 1))
        off = 1.0 - (w * w).sum()
        within_s = ((pair * k_ss).sum() - (w * w * k_ss.diagonal()).sum()) / off.clamp_min(1e-12)
    else:
        within_s = (pair * k_ss).sum()
    return within_s + within_t - 2.0 * (w[:, None] * k_st).sum() / m


def mk_mmd(
    source: torch.Tensor,
    target: torch.Tensor,
    multipliers: Sequence[float] = DEFAULT_MULTIPLIERS,
    estimator: str = "unbiased",
    source_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-kernel ``MMD^2`` between ``source [n, F]`` and ``target [m, F]`` -> scalar
    (``source_weights [n]``: see :func:`mmd_from_kernel`)."""
    _check_pair(source, target)
    z = torch.cat([source, target], dim=0)
    return mmd_from_kernel(gaussian_kernel_matrix(z, multipliers), source.shape[0], estimator, source_weights)


def joint_mk_mmd(
    sources: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    multipliers: Sequence[float] = DEFAULT_MULTIPLIERS,
    estimator: str = "unbiased",
    source_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """JMMD: ``MMD^2`` of the joint distribution of several variables of one sample.

    ``sources[i] [n, F_i]`` and ``targets[i] [m, F_i]`` are the i-th variable (e.g. fused
    features and predicted boxes). The joint kernel is the product of one multi-kernel per
    variable, each with its own median bandwidth, so no variable dominates by its scale.
    ``source_weights [n]``: see :func:`mmd_from_kernel`.
    """
    if len(sources) != len(targets) or not sources:
        raise ValueError("joint_mk_mmd needs the same (non-zero) number of source and target variables")
    kernel = None
    for s, t in zip(sources, targets):
        _check_pair(s, t)
        if s.shape[0] != sources[0].shape[0] or t.shape[0] != targets[0].shape[0]:
            raise ValueError("all variables of a domain must have the same number of samples")
        k = gaussian_kernel_matrix(torch.cat([s, t], dim=0), multipliers)
        kernel = k if kernel is None else kernel * k
    return mmd_from_kernel(kernel, sources[0].shape[0], estimator, source_weights)


def size_shift_weights(source_boxes: torch.Tensor, target_boxes: torch.Tensor, bandwidth: float = 0.35,
                       max_weight: float = 10.0) -> torch.Tensor:
    """Importance weights ``[n]`` that give the source sample the target's box-size distribution.

    ``source_boxes [n, 4]`` and ``target_boxes [m, 4]`` are (cx, cy, w, h) boxes (predicted
    ones: target boxes are unknown). The size of a box is its log area; the weight of a source
    box is the density ratio ``p_t(size) / p_s(size)``, both densities Gaussian kernel
    estimates over the batch with ``bandwidth`` (in log-area units; 0.35 ~ a factor 1.4 in
    area), clipped to ``max_weight`` times the smallest and normalised to mean 1. Detached:
    they are constants of the loss.

    Why: the conditional feature ``fused`` also sets the box size. Where the target's products
    are smaller than the source's (as in ProductWorld live against mall), plain alignment pulls
    the target's boxes to source sizes (docs/experiments.md has the predicted / true areas). Weighted by size, the source sample that the target is compared with
    has the target's sizes, so alignment has no size difference left to close.
    """
    if source_boxes.ndim != 2 or target_boxes.ndim != 2 or source_boxes.shape[1] < 4 or target_boxes.shape[1] < 4:
        raise ValueError(f"expected [N, 4] boxes, got {tuple(source_boxes.shape)} and {tuple(target_boxes.shape)}")
    if bandwidth <= 0 or max_weight < 1:
        raise ValueError(f"bandwidth must be > 0 and max_weight >= 1, got {bandwidth} and {max_weight}")
    with torch.no_grad():
        def log_area(b: torch.Tensor) -> torch.Tensor:
            return (b[:, 2].float() * b[:, 3].float()).clamp_min(1e-6).log()

        a_s, a_t = log_area(source_boxes), log_area(target_boxes)

        def density(at: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
            return torch.exp(-0.5 * ((at[:, None] - sample[None, :]) / bandwidth) ** 2).mean(dim=1)

        ratio = density(a_s, a_t) / density(a_s, a_s).clamp_min(1e-12)
        ratio = torch.maximum(ratio, ratio.max() / max_weight)  # a tensor bound: no host sync per step
        return ratio / ratio.mean()


def _check_pair(source: torch.Tensor, target: torch.Tensor) -> None:
    if source.ndim != 2 or target.ndim != 2:
        raise ValueError(f"MMD expects [N, F] samples, got {tuple(source.shape)} and {tuple(target.shape)}")
    if source.shape[1] != target.shape[1]:
        raise ValueError(f"source and target feature sizes differ: {source.shape[1]} vs {target.shape[1]}")
