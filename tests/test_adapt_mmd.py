"""MK-MMD and JMMD: zero on one distribution, growing with a shift, blind to scale."""
from __future__ import annotations

import pytest
import torch

from date_core.adapt.mmd import gaussian_kernel_matrix, joint_mk_mmd, mk_mmd, mmd_from_kernel, size_shift_weights


def _gauss(n: int, dim: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g) + shift


@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
def test_mmd_near_zero_for_one_distribution_and_monotone_in_shift(estimator):
    shifts = [0.0, 0.25, 0.5, 1.0, 2.0]
    means = []
    for shift in shifts:
        vals = [float(mk_mmd(_gauss(64, 16, 2 * s), _gauss(64, 16, 2 * s + 1, shift), estimator=estimator))
                for s in range(5)]
        means.append(sum(vals) / len(vals))
    # Same distribution: noise around 0 (unbiased) or the small positive bias (biased).
    assert abs(means[0]) < 0.02, means
    assert all(b > a for a, b in zip(means, means[1:])), f"MMD not monotone in the shift: {means}"
    assert means[-1] > 20 * max(abs(means[0]), 1e-3), means


def test_unbiased_is_centred_and_biased_is_not():
    unbiased = [float(mk_mmd(_gauss(32, 8, s), _gauss(32, 8, 100 + s))) for s in range(20)]
    biased = [float(mk_mmd(_gauss(32, 8, s), _gauss(32, 8, 100 + s), estimator="biased")) for s in range(20)]
    assert abs(sum(unbiased) / 20) < 0.005
    assert min(biased) > 0 and sum(biased) / 20 > 0.02  # ~ 1/n + 1/m minus within-sample similarity


def test_mmd_is_invariant_to_a_common_rescaling():
    # The median-heuristic bandwidth follows the features' scale, so shrinking every feature
    # (a trivial way to "align" with a fixed bandwidth) does not lower the loss.
    x, y = _gauss(40, 12, 0), _gauss(40, 12, 1, shift=0.7)
    base = mk_mmd(x, y)
    for c in (1e-3, 0.1, 10.0):
        assert torch.allclose(mk_mmd(c * x, c * y), base, rtol=1e-3, atol=1e-5)


def test_kernel_matrix_is_a_valid_kernel():
    z = _gauss(30, 5, 3)
    k = gaussian_kernel_matrix(z)
    assert k.shape == (30, 30)
    assert torch.allclose(k.diagonal(), torch.ones(30))
    assert torch.allclose(k, k.T)
    assert torch.linalg.eigvalsh(k.double()).min() > -1e-6  # positive semi-definite


def test_joint_mmd_sees_a_conditional_shift_the_marginals_miss():
    # Same marginals of features and boxes in both domains, but the target pairs a feature
    # with another sample's box: only the joint (conditional) discrepancy can see it.
    f = _gauss(128, 2, 0)
    box_src = torch.sigmoid(f * 2)
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(1))
    f_t = _gauss(128, 2, 2)
    box_tgt = torch.sigmoid(f_t * 2)[perm]
    marg_f = float(mk_mmd(f, f_t))
    marg_b = float(mk_mmd(box_src, box_tgt))
    joint = float(joint_mk_mmd([f, box_src], [f_t, box_tgt]))
    joint_aligned = float(joint_mk_mmd([f, box_src], [f_t, torch.sigmoid(f_t * 2)]))
    assert joint > 5 * max(abs(marg_f), abs(marg_b), 1e-3), (joint, marg_f, marg_b)
    assert joint > 5 * max(abs(joint_aligned), 1e-3), (joint, joint_aligned)


def test_mmd_is_differentiable_towards_alignment():
    x = _gauss(32, 6, 0)
    y = _gauss(32, 6, 1, shift=1.0).requires_grad_(True)
    loss = mk_mmd(x, y)
    loss.backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    # One gradient step moves the target towards the source and lowers the discrepancy.
    with torch.no_grad():
        y2 = y - 5.0 * y.grad
    assert float(mk_mmd(x, y2)) < float(loss.detach())


def test_mmd_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2 samples"):
        mk_mmd(_gauss(1, 4, 0), _gauss(5, 4, 1))
    with pytest.raises(ValueError, match="feature sizes differ"):
        mk_mmd(_gauss(4, 4, 0), _gauss(4, 5, 1))
    with pytest.raises(ValueError, match="estimator"):
        mk_mmd(_gauss(4, 4, 0), _gauss(4, 4, 1), estimator="linear")
    with pytest.raises(ValueError, match="> 0"):
        mk_mmd(_gauss(4, 4, 0), _gauss(4, 4, 1), multipliers=[1.0, 0.0])


def test_mmd_stays_float32_under_autocast():
    x, y = _gauss(32, 64, 0), _gauss(32, 64, 1, shift=0.3)
    ref = mk_mmd(x, y)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        amp = mk_mmd(x, y)
    assert amp.dtype == torch.float32
    assert torch.allclose(amp, ref, atol=1e-6)


# ----------------------------------------------------------------------------- weighted MMD
@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
def test_equal_source_weights_change_nothing(estimator):
    s, t = _gauss(24, 6, 1), _gauss(20, 6, 2, 0.5)
    plain = mk_mmd(s, t, estimator=estimator)
    weighted = mk_mmd(s, t, estimator=estimator, source_weights=torch.full((24,), 3.0))
    assert float(weighted) == pytest.approx(float(plain), rel=1e-5, abs=1e-7)


def test_integer_weights_equal_repeating_samples_in_the_v_statistic():
    # weight 2 on a source sample = that sample twice (same kernel matrix, so the same bandwidth)
    s, t = _gauss(5, 4, 3), _gauss(6, 4, 4, 1.0)
    z_rep = torch.cat([s, s[:2], t])                                    # samples 0 and 1 twice
    k_rep = gaussian_kernel_matrix(z_rep)
    keep = torch.tensor([0, 1, 2, 3, 4, 7, 8, 9, 10, 11, 12])          # the rows of s and t once
    w = torch.tensor([2.0, 2.0, 1.0, 1.0, 1.0])
    weighted = mmd_from_kernel(k_rep[keep][:, keep], 5, "biased", source_weights=w)
    repeated = mmd_from_kernel(k_rep, 7, "biased")
    assert float(weighted) == pytest.approx(float(repeated), rel=1e-5)


def test_weights_on_the_matching_part_of_the_source_remove_the_discrepancy():
    # source = half like the target, half shifted far away; weights on the first half make the
    # weighted source the target's distribution
    near, far, t = _gauss(40, 4, 5), _gauss(40, 4, 6, 4.0), _gauss(40, 4, 7)
    s = torch.cat([near, far])
    w = torch.cat([torch.ones(40), torch.zeros(40)])
    plain = float(mk_mmd(s, t))
    weighted = float(mk_mmd(s, t, source_weights=w))
    assert plain > 0.1 and abs(weighted) < 0.2 * plain, (plain, weighted)
    with pytest.raises(ValueError, match="non-negative"):
        mk_mmd(s, t, source_weights=-w)


def _boxes(areas: list[float]) -> torch.Tensor:
    side = torch.tensor(areas).sqrt()
    return torch.stack([torch.full_like(side, 0.5), torch.full_like(side, 0.5), side, side], dim=1)


def test_size_shift_weights_give_the_source_the_targets_sizes():
    src = _boxes([0.04] * 8 + [0.16] * 8)       # half small, half large products
    tgt = _boxes([0.04] * 10)                   # the target: small ones only
    w = size_shift_weights(src, tgt)
    assert w.shape == (16,) and not w.requires_grad
    assert float(w.mean()) == pytest.approx(1.0, rel=1e-5)
    assert float(w[:8].min()) > 5 * float(w[8:].max())                 # small source boxes count
    assert float(w.max() / w.min()) <= 10.0 + 1e-4                     # clipped: max_weight
    # one size in both domains: equal weights
    same = size_shift_weights(_boxes([0.1] * 6), _boxes([0.1] * 4))
    assert torch.allclose(same, torch.ones(6))
