"""The MMD domain aligner: its named, differentiable loss dict and its choices."""
from __future__ import annotations

import pytest
import torch

from _aligner import build_plain

from date_core.adapt.aligner import CONDITIONAL, MARGINAL_IMAGE, MARGINAL_QUERY, pool_tokens
from date_core.config import default_config


def _outputs(n: int, shift: float, seed: int, k: int = 4, d: int = 8, fd: int = 8, grad: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {
        "image_tokens": torch.randn(n, k, d, generator=g) + shift,
        "query_tokens": torch.randn(n, k, d, generator=g) + shift,
        "fused": torch.randn(n, fd, generator=g) + shift,
        "pred_boxes": torch.rand(n, 4, generator=g),
        "pred_conf": torch.rand(n, generator=g),
    }
    if grad:
        for v in out.values():
            v.requires_grad_(True)
    return out


def _mmd_aligner(**cfg):
    return build_plain({"aligner": "mmd", **cfg}, token_dim=8, num_tokens=4, fused_dim=8)


def test_loss_names_are_weight_keys_of_the_config():
    weights = default_config()["loss"]
    mmd = _mmd_aligner()
    adv = build_plain({"aligner": "adversarial"}, token_dim=8, num_tokens=4, fused_dim=8)
    for aligner in (mmd, adv):
        losses = aligner(_outputs(8, 0.0, 1), _outputs(8, 1.0, 2))
        assert set(losses) == set(aligner.loss_names)
        assert set(losses) <= set(weights), f"{sorted(losses)} are not all keys of loss: {sorted(weights)}"
    assert set(mmd.loss_names) == {MARGINAL_IMAGE, MARGINAL_QUERY, CONDITIONAL}


@pytest.mark.parametrize("pooling", ["flatten", "mean", "tokens"])
@pytest.mark.parametrize("conditional", ["joint", "fused"])
def test_mmd_aligner_is_differentiable_and_sees_the_shift(pooling, conditional):
    aligner = _mmd_aligner(token_pooling=pooling, conditional=conditional)
    src, tgt = _outputs(16, 0.0, 1, grad=True), _outputs(16, 1.0, 2, grad=True)
    losses = aligner(src, tgt)
    same = aligner(_outputs(16, 0.0, 3), _outputs(16, 0.0, 4))
    for name, value in losses.items():
        assert value.ndim == 0 and torch.isfinite(value)
        assert float(value.detach()) > 5 * max(abs(float(same[name])), 1e-3), (name, float(value.detach()), float(same[name]))
    sum(losses.values()).backward()
    for key in ("image_tokens", "query_tokens", "fused"):
        assert torch.isfinite(tgt[key].grad).all() and tgt[key].grad.abs().sum() > 0, key
    assert aligner.last_stats.keys() == losses.keys()


def test_conditional_alignment_conditions_on_boxes_without_moving_them():
    src, tgt = _outputs(8, 0.0, 1, grad=True), _outputs(8, 1.0, 2, grad=True)
    _mmd_aligner()(src, tgt)[CONDITIONAL].backward()
    assert src["pred_boxes"].grad is None and tgt["fused"].grad.abs().sum() > 0
    src, tgt = _outputs(8, 0.0, 1, grad=True), _outputs(8, 1.0, 2, grad=True)
    _mmd_aligner(conditional_detach_boxes=False)(src, tgt)[CONDITIONAL].backward()
    assert src["pred_boxes"].grad.abs().sum() > 0


def test_a_batch_too_small_for_mmd_contributes_zero_but_keeps_the_graph():
    src, tgt = _outputs(1, 0.0, 1, grad=True), _outputs(5, 1.0, 2, grad=True)
    losses = _mmd_aligner()(src, tgt)
    assert all(float(v.detach()) == 0.0 for v in losses.values())
    sum(losses.values()).backward()  # no error: still attached
    assert tgt["fused"].grad is not None


def test_pool_tokens_shapes():
    t = torch.randn(3, 4, 8)
    assert pool_tokens(t, "flatten").shape == (3, 32)
    assert pool_tokens(t, "mean").shape == (3, 8)
    assert pool_tokens(t, "tokens").shape == (12, 8)
    # flatten keeps which slot carries what: swapping two slots is a shift; mean cannot see it.
    swapped = t[:, [1, 0, 2, 3]]
    assert not torch.allclose(pool_tokens(t, "flatten"), pool_tokens(swapped, "flatten"))
    assert torch.allclose(pool_tokens(t, "mean"), pool_tokens(swapped, "mean"))


def test_bad_config_and_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="aligner"):
        build_plain({"aligner": "coral"}, token_dim=8, num_tokens=4, fused_dim=8)
    with pytest.raises(ValueError, match="token_pooling"):
        _mmd_aligner(token_pooling="max")
    with pytest.raises(ValueError, match="conditional"):
        _mmd_aligner(conditional="cdan")
    with pytest.raises(ValueError, match="estimator"):
        _mmd_aligner(mmd={"estimator": "linear"})
    src = _outputs(4, 0.0, 1)
    del src["fused"]
    with pytest.raises(KeyError, match="fused"):
        _mmd_aligner()(src, _outputs(4, 0.0, 2))
    with pytest.raises(ValueError, match="image_tokens"):
        _mmd_aligner()(_outputs(4, 0.0, 1), _outputs(4, 0.0, 2, d=6))


@pytest.mark.parametrize("protect_box", [False, True])
@pytest.mark.parametrize("kind", ["mmd", "adversarial"])
def test_aligner_on_the_real_tiny_model_trains_the_model(kind, protect_box):
    from date_core import build_model
    from date_core.adapt import build_aligner_for_model

    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=50)
    aligner = build_aligner_for_model({"aligner": kind, "protect_box": protect_box}, model)
    if kind == "adversarial":
        aligner.set_progress(0.5)  # the DANN schedule starts at coefficient 0: no gradient yet
    size, n, length = model.config.image_size, 4, 8

    def forward(shift: float) -> dict:
        return model(torch.randn(n, 3, size, size) + shift, torch.randint(5, 50, (n, length)),
                     torch.ones(n, length, dtype=torch.long))

    losses = aligner(forward(0.0), forward(0.5))
    assert set(losses) == set(aligner.loss_names)
    sum(losses.values()).backward()
    grads = [p.grad for p in model.image_aggregator.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


def _sized_outputs(areas: list[float], seed: int) -> dict:
    # fused carries the box size (as the seeker's size head reads it); everything else is one
    # distribution in both domains
    out = _outputs(len(areas), 0.0, seed)
    side = torch.tensor(areas).sqrt()
    out["pred_boxes"] = torch.stack([torch.full_like(side, 0.5), torch.full_like(side, 0.5), side, side], dim=1)
    out["fused"] = out["fused"] * 0.3
    out["fused"][:, 0] = 4.0 * side.log()
    out["image_tokens"] = out["image_tokens"] * 0.3
    out["image_tokens"][:, :, 0] = 4.0 * side.log()[:, None]
    return out


@pytest.mark.parametrize("conditional", ["joint", "fused"])
def test_size_reweight_leaves_a_pure_size_shift_unaligned(conditional):
    # source products come in two sizes, the target's only in the small one: the only shift
    # is the size distribution, which plain alignment would close by moving target sizes
    src = _sized_outputs([0.03] * 24 + [0.2] * 24, seed=1)
    tgt = _sized_outputs([0.03] * 32, seed=2)
    plain = _mmd_aligner(conditional=conditional)(src, tgt)
    aligner = _mmd_aligner(conditional=conditional, size_reweight=True)
    weighted = aligner(src, tgt)
    for term in (CONDITIONAL, MARGINAL_IMAGE):
        assert float(plain[term]) > 0.05, (term, plain)
        assert float(weighted[term]) < 0.25 * float(plain[term]), (term, plain, weighted)
    assert float(weighted[MARGINAL_QUERY]) == pytest.approx(float(plain[MARGINAL_QUERY]))  # queries have no size
    assert 10 < aligner.last_stats["size_weight_ess"] < 48                # about the 24 small ones


def test_adversarial_size_reweight_weights_the_source_pairs_of_the_discriminators():
    from date_core.adapt.mmd import size_shift_weights

    src = _sized_outputs([0.03] * 6 + [0.2] * 6, seed=3)
    tgt = _sized_outputs([0.03] * 8, seed=4)
    cfg = {"aligner": "adversarial", "discriminator": {"dropout": 0.0}}
    plain = build_plain(cfg, token_dim=8, num_tokens=4, fused_dim=8).eval()
    weighted = build_plain({**cfg, "size_reweight": True}, token_dim=8, num_tokens=4, fused_dim=8).eval()
    weighted.load_state_dict(plain.state_dict())                        # the same discriminators
    w = size_shift_weights(src["pred_boxes"], tgt["pred_boxes"])
    expected = 0.0
    for part in ("image", "query", "conditional"):
        logits = torch.cat([plain.discriminators[part](plain._features(o, part)).squeeze(1) for o in (src, tgt)])
        labels = torch.cat([torch.ones(12), torch.zeros(8)])
        sample_w = None if part == "query" else torch.cat([w, torch.ones(8)])
        expected += torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, weight=sample_w) / 3
    got = weighted(src, tgt)["adversarial"]
    assert float(got.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert abs(float(got.detach()) - float(plain(src, tgt)["adversarial"].detach())) > 1e-4
    assert 0 < weighted.last_stats["size_weight_ess"] < 12


# ----------------------------------------------------------------------------- protect_box
def _seeker_and_fused(n: int, shift: float, seed: int, d: int = 16):
    from date_core.model.seekers import GroundingSeeker

    torch.manual_seed(0)
    seeker = GroundingSeeker(d, heads=2, layers=1, mlp=32)
    # a size head that reads fused strongly (a fresh one starts near constant)
    for layer in (seeker.size[0], seeker.size[2], seeker.refine):
        torch.nn.init.normal_(layer.weight, std=0.5)
    g = torch.Generator().manual_seed(seed)
    return seeker, torch.randn(n, d, generator=g) + shift


def test_box_jacobian_matches_autograd_per_pair():
    seeker, fused = _seeker_and_fused(5, 0.0, 1)
    jac = seeker.box_jacobian(fused)
    assert jac.shape == (5, 4, 16)
    for i in (0, 3):
        full = torch.autograd.functional.jacobian(
            lambda f: torch.cat([seeker.size(f), seeker.refine(f)], dim=-1), fused[i:i + 1])  # [1, 4, 1, 16]
        torch.testing.assert_close(jac[i], full[0, :, 0], rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in seeker.parameters()), "the Jacobian must not train the head"


@pytest.mark.parametrize("kind", ["mmd", "adversarial"])
def test_protect_box_removes_the_conditional_gradient_along_the_box_head(kind):
    seeker, fs = _seeker_and_fused(12, 0.0, 1)
    _, ft = _seeker_and_fused(12, 1.5, 2)
    cfg = {"aligner": kind, "size_reweight": False}
    if kind == "adversarial":
        cfg["discriminator"] = {"parts": {"image": 0.0, "query": 0.0, "conditional": 1.0}}
    grads = {}
    for protect in (False, True):
        torch.manual_seed(0)
        aligner = build_plain({**cfg, "protect_box": protect}, token_dim=8, num_tokens=4, fused_dim=16,
                                box_jacobian=seeker.box_jacobian)
        if kind == "adversarial":
            aligner.set_progress(1.0)  # the GRL warm-up starts at 0: no gradient at all
        src, tgt = _outputs(12, 0.0, 1, fd=16), _outputs(12, 1.0, 2, fd=16)
        src["fused"], tgt["fused"] = fs.clone().requires_grad_(True), ft.clone().requires_grad_(True)
        sum(aligner(src, tgt).values()).backward()
        grads[protect] = tgt["fused"].grad
    jac = seeker.box_jacobian(ft)  # [B, 4, d]
    along = lambda g: torch.einsum("bmd,bd->bm", torch.nn.functional.normalize(jac, dim=-1), g).abs()  # noqa: E731
    assert along(grads[False]).max() > 1e-3 * grads[False].norm(), "the unprotected gradient moves the box"
    assert along(grads[True]).max() < 1e-5 * grads[False].norm()
    assert grads[True].norm() > 0.1 * grads[False].norm(), "the rest of the gradient is kept"


def test_protected_alignment_steps_leave_the_box_head_outputs_alone():
    """Descending the conditional MMD on the target's fused features moves their boxes; with
    protect_box the same steps leave the box head's outputs (to first order) where they were."""
    seeker, fs = _seeker_and_fused(16, 0.0, 1)
    _, ft0 = _seeker_and_fused(16, 1.5, 2)
    head = lambda f: torch.cat([seeker.size(f), seeker.refine(f)], dim=-1)  # noqa: E731
    moved = {}
    for protect in (False, True):
        aligner = build_plain({"aligner": "mmd", "conditional": "fused", "size_reweight": False,
                                 "protect_box": protect}, token_dim=8, num_tokens=4, fused_dim=16,
                                box_jacobian=seeker.box_jacobian)
        ft = ft0.clone().requires_grad_(True)
        opt = torch.optim.SGD([ft], lr=5.0)
        start = float(aligner({**_outputs(16, 0, 1, fd=16), "fused": fs}, {**_outputs(16, 1, 2, fd=16), "fused": ft})
                      [CONDITIONAL].detach())
        for _ in range(10):
            opt.zero_grad()
            loss = aligner({**_outputs(16, 0, 1, fd=16), "fused": fs}, {**_outputs(16, 1, 2, fd=16), "fused": ft})
            loss[CONDITIONAL].backward()
            opt.step()
        assert float(loss[CONDITIONAL].detach()) < start, "the alignment still makes progress"
        with torch.no_grad():
            moved[protect] = float((head(ft) - head(ft0)).abs().mean())
    assert moved[False] > 0.05
    assert moved[True] < 0.05 * moved[False], moved


def test_protect_box_needs_the_model():
    with pytest.raises(ValueError, match="build_aligner_for_model"):
        _mmd_aligner(protect_box=True)
