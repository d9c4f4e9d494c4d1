"""Gradient reversal, its schedule, and the adversarial discriminator."""
from __future__ import annotations

import math

import pytest
import torch

from _aligner import build_plain

from date_core.adapt import GradientReversal, grad_reverse, grl_coefficient
from date_core.adapt.aligner import ADVERSARIAL, AdversarialAligner


@pytest.mark.parametrize("coeff", [0.0, 0.3, 1.0, 2.5])
def test_gradient_reversal_flips_and_scales_the_gradient(coeff):
    x = torch.randn(5, 3, requires_grad=True)
    upstream = torch.randn(5, 3)
    y = grad_reverse(x, coeff)
    assert torch.equal(y, x)  # identity going forward
    y.backward(upstream)
    assert torch.allclose(x.grad, -coeff * upstream)
    mod = GradientReversal(coeff)
    x.grad = None
    (mod(x) * upstream).sum().backward()
    assert torch.allclose(x.grad, -coeff * upstream)
    with pytest.raises(ValueError):
        grad_reverse(x, -1.0)


def test_grl_coefficient_schedules():
    dann = [grl_coefficient(s, 100) for s in range(0, 201, 10)]
    assert dann[0] == 0.0
    assert all(b >= a for a, b in zip(dann, dann[1:]))
    assert math.isclose(dann[5], 2 / (1 + math.exp(-5)) - 1)
    assert dann[10] > 0.999 and dann[-1] == dann[10]  # saturates, then holds
    assert grl_coefficient(50, 100, "linear", max_coeff=0.5) == 0.25
    assert grl_coefficient(0, 100, "constant", max_coeff=0.7) == 0.7
    with pytest.raises(ValueError):
        grl_coefficient(0, 100, "cosine")
    with pytest.raises(ValueError):
        grl_coefficient(0, 0)


def _outputs(n: int, shift: float, seed: int, k: int = 4, d: int = 8, fd: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "image_tokens": torch.randn(n, k, d, generator=g) + shift,
        "query_tokens": torch.randn(n, k, d, generator=g) + shift,
        "fused": torch.randn(n, fd, generator=g) + shift,
        "pred_boxes": torch.rand(n, 4, generator=g),
        "pred_conf": torch.rand(n, generator=g),
    }


SHIFT = 1.0


def test_discriminator_learns_to_separate_shifted_domains_when_grl_is_off():
    torch.manual_seed(0)
    aligner = build_plain({"aligner": "adversarial", "discriminator": {
        "hidden": 32, "dropout": 0.0, "grl_schedule": "constant", "grl_max_coeff": 0.0}},
        token_dim=8, num_tokens=4, fused_dim=8)
    opt = torch.optim.Adam(aligner.parameters(), lr=3e-3)
    first = None
    for step in range(150):
        src, tgt = _outputs(32, 0.0, 2 * step), _outputs(32, SHIFT, 2 * step + 1)
        for out in (src, tgt):
            out["image_tokens"].requires_grad_(True)
        loss = aligner(src, tgt)[ADVERSARIAL]
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        # GRL off: the features receive no gradient at all, only the discriminators learn.
        assert torch.count_nonzero(src["image_tokens"].grad) == 0
        opt.step()
    aligner.eval()
    with torch.no_grad():
        final = float(aligner(_outputs(512, 0.0, 10_001), _outputs(512, SHIFT, 10_002))[ADVERSARIAL])
    stats = aligner.last_stats
    assert first > 0.6 and final < 0.3, (first, final)
    # Held-out accuracy close to the Bayes accuracy Phi(shift * sqrt(dim) / 2) of two unit
    # Gaussians shifted along the diagonal (32 token dims, 8 fused dims).
    for part, dim in (("image", 32), ("query", 32), ("conditional", 8)):
        bayes = 0.5 * (1 + math.erf(SHIFT * math.sqrt(dim) / 2 / math.sqrt(2)))
        assert stats[f"disc_acc_{part}"] > bayes - 0.06, (part, bayes, stats)


def test_reversed_feature_gradient_is_the_negated_discriminator_gradient():
    torch.manual_seed(0)
    aligner = AdversarialAligner(8, 4, 8, hidden=16, dropout=0.0, parts={"image": 1.0},
                                 grl_schedule="constant", grl_max_coeff=0.4)
    src, tgt = _outputs(6, 0.0, 1), _outputs(6, 1.0, 2)
    src["image_tokens"].requires_grad_(True)
    aligner(src, tgt)[ADVERSARIAL].backward()
    reversed_grad = src["image_tokens"].grad.clone()
    # The same loss without reversal: the gradient that would help the discriminator.
    feats = torch.cat([src["image_tokens"].flatten(1), tgt["image_tokens"].flatten(1)])
    logits = aligner.discriminators["image"](feats).squeeze(1)
    labels = torch.cat([torch.ones(6), torch.zeros(6)])
    plain = torch.autograd.grad(torch.nn.functional.binary_cross_entropy_with_logits(logits, labels),
                                src["image_tokens"])[0]
    assert plain.abs().sum() > 0
    assert torch.allclose(reversed_grad, -0.4 * plain, atol=1e-6)


def test_grl_step_counter_advances_in_training_only_and_is_checkpointed():
    aligner = AdversarialAligner(8, 4, 8, hidden=16, grl_max_steps=10)
    assert aligner.grl_coeff == 0.0
    src, tgt = _outputs(4, 0.0, 1), _outputs(4, 1.0, 2)
    for _ in range(5):
        aligner(src, tgt)
    assert int(aligner.step) == 5
    assert math.isclose(aligner.grl_coeff, grl_coefficient(5, 10))
    aligner.eval()
    aligner(src, tgt)
    assert int(aligner.step) == 5
    restored = AdversarialAligner(8, 4, 8, hidden=16, grl_max_steps=10)
    restored.load_state_dict(aligner.state_dict())
    assert int(restored.step) == 5
    restored.set_progress(1.0)
    assert restored.grl_coeff > 0.999


def test_adversarial_parameters_train_with_the_model():
    aligner = build_plain({"aligner": "adversarial"}, token_dim=8, num_tokens=4, fused_dim=8)
    params = list(aligner.parameters())
    assert params and all(p.requires_grad for p in params)
    aligner(_outputs(4, 0.0, 1), _outputs(4, 1.0, 2))[ADVERSARIAL].backward()
    assert all(p.grad is not None for p in params)
    with pytest.raises(ValueError, match="parts"):
        build_plain({"aligner": "adversarial", "discriminator": {"parts": {"box": 1.0}}},
                      token_dim=8, num_tokens=4, fused_dim=8)
