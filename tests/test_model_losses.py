"""The loss dict: InfoNCE (single process and across a real 2-process gloo group), box terms
with alt boxes and pseudo-box weights, the weight dict."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from date_core import batch as B
from date_core.config import default_config
from date_core.training.losses import LOSS_NAMES, DateCriterion, focus_targets, gather_with_local_grad, info_nce


def _pairs(n=6, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    qry = F.normalize(img + 0.3 * torch.randn(n, dim, generator=g), dim=-1)
    return img, qry


def test_loss_names_match_the_config_section():
    assert tuple(default_config()["loss"]) == LOSS_NAMES
    crit = DateCriterion(default_config()["loss"])
    assert crit.weights == {k: float(v) for k, v in default_config()["loss"].items()}
    with pytest.raises(KeyError, match="unknown loss term"):
        DateCriterion({"box_L1": 1.0})
    with pytest.raises(KeyError, match="unknown loss term"):
        crit.total({"retreival": torch.tensor(1.0)})


def test_info_nce_equals_symmetric_cross_entropy():
    img, qry = _pairs()
    scale = torch.tensor(10.0)
    logits = scale * img @ qry.t()
    target = torch.arange(6)
    expected = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    torch.testing.assert_close(info_nce(img, qry, scale), expected)
    # unique item keys are the plain loss; a shared item turns a false negative into a positive
    torch.testing.assert_close(info_nce(img, qry, scale, torch.arange(6)), expected)
    items = torch.tensor([0, 0, 1, 2, 3, 4])
    shared = info_nce(img, qry, scale, items)
    soft = torch.zeros(6, 6)
    soft[:2, :2] = 0.5
    soft[2:, 2:] = torch.eye(4)
    manual = (F.cross_entropy(logits, soft) + F.cross_entropy(logits.t(), soft)) / 2
    torch.testing.assert_close(shared, manual)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, img, qry, items, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # uneven shards: rank 0 holds 4 pairs, rank 1 holds 3
        sl = slice(0, 4) if rank == 0 else slice(4, 7)
        local_img = img[sl].clone().requires_grad_(True)
        local_qry = qry[sl].clone().requires_grad_(True)
        loss = info_nce(local_img, local_qry, torch.tensor(7.0), items[sl])
        loss.backward()
        torch.save({"loss": loss.detach(), "g_img": local_img.grad, "g_qry": local_qry.grad,
                    "gathered": gather_with_local_grad(items[sl])}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_info_nce_across_two_gloo_processes_equals_the_concatenated_batch(tmp_path):
    img, qry = _pairs(n=7, seed=3)
    items = torch.tensor([0, 1, 2, 2, 3, 4, 5])  # a shared item straddles no rank, one within rank 0
    mp.spawn(_worker, args=(2, _free_port(), img, qry, items, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")

    full_img, full_qry = img.clone().requires_grad_(True), qry.clone().requires_grad_(True)
    full = info_nce(full_img, full_qry, torch.tensor(7.0), items)
    full.backward()
    # every rank computes the global loss ...
    torch.testing.assert_close(r0["loss"], full.detach())
    torch.testing.assert_close(r1["loss"], full.detach())
    assert r0["gathered"].tolist() == items.tolist()
    # ... and the gradient flows through its own shard only: the shards' gradients together are
    # the full-batch gradient (DDP then averages parameter gradients over ranks)
    torch.testing.assert_close(torch.cat([r0["g_img"], r1["g_img"]]), full_img.grad)
    torch.testing.assert_close(torch.cat([r0["g_qry"], r1["g_qry"]]), full_qry.grad)


def _outputs(pred_boxes, n=None):
    n = pred_boxes.shape[0]
    img, qry = _pairs(n)
    return {"image_emb": img, "query_emb": qry, "logit_scale": torch.tensor(10.0),
            "pred_boxes": pred_boxes, "pred_conf_logit": torch.zeros(n), "pred_conf": torch.full((n,), 0.5)}


def _batch(boxes, has_box=None, weight=None, alt=None, alt_mask=None):
    n = boxes.shape[0]
    out = {B.BOXES: boxes, B.HAS_BOX: torch.ones(n) if has_box is None else has_box,
           B.BOX_WEIGHT: torch.ones(n) if weight is None else weight, B.ITEM_KEY: torch.arange(n)}
    if alt is not None:
        out[B.ALT_BOXES], out[B.ALT_MASK] = alt, alt_mask
    return out


def test_box_terms_hand_computed():
    gt = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2]])
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.4, 0.3, 0.2, 0.2]])  # exact; shifted by 0.1
    terms = DateCriterion()(_outputs(pred), _batch(gt))
    assert float(terms["box_l1"]) == pytest.approx(0.1 / 2)             # sum over coords / n boxes
    assert float(terms["box_giou"]) == pytest.approx((0 + (1 - 1 / 3)) / 2, abs=1e-5)  # IoU 1/3, hull = union
    # confidence is BCE of logit 0 against the boxes' IoUs (1 and 1/3) -> ln 2 each
    assert float(terms["confidence"]) == pytest.approx(0.6931, abs=1e-3)


def test_box_terms_use_best_alt_box_skip_unlabelled_and_scale_by_weight():
    gt = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2]])
    pred = torch.tensor([[0.8, 0.8, 0.1, 0.1], [0.4, 0.3, 0.2, 0.2], [0.9, 0.9, 0.1, 0.1]])
    alt = torch.zeros(3, 2, 4)
    alt[0, 0] = torch.tensor([0.8, 0.8, 0.1, 0.1])  # pair 0's prediction is one valid alternative
    alt_mask = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    has_box = torch.tensor([1.0, 1.0, 0.0])           # pair 2 is unlabelled target data
    weight = torch.tensor([1.0, 0.5, 1.0])            # pair 1 is a pseudo box with reliability 0.5
    terms = DateCriterion()(_outputs(pred), _batch(gt, has_box, weight, alt, alt_mask))
    assert float(terms["box_l1"]) == pytest.approx((0 + 0.5 * 0.1) / 2)
    assert float(terms["box_giou"]) == pytest.approx((0 + 0.5 * (2 / 3)) / 2, abs=1e-5)
    # no labelled row at all: zero box terms that still carry a graph
    pred.requires_grad_(True)
    none = DateCriterion()(_outputs(pred), _batch(gt, torch.zeros(3)))
    assert float(none["box_l1"]) == 0.0 and none["box_l1"].requires_grad


def test_weighted_total_and_zero_weights():
    crit = DateCriterion({"box_l1": 5.0, "box_giou": 0.0, "align_conditional": 0.5})
    terms = {"box_l1": torch.tensor(2.0), "box_giou": torch.tensor(float("nan")), "align_conditional": torch.tensor(4.0)}
    # a zero weight switches its term off entirely (even a NaN one)
    assert float(crit.total(terms)) == pytest.approx(12.0)


def test_focus_targets_cover_the_patches_inside_the_box():
    # grid 4 (patch centres at 0.125, 0.375, 0.625, 0.875); box x 0.3..0.7, y 0.0..0.5
    t = focus_targets(torch.tensor([[0.5, 0.25, 0.4, 0.5], [0.9, 0.9, 0.05, 0.05]]), 16)
    first = t[0].view(4, 4)
    assert torch.allclose(first[:2, 1:3], torch.full((2, 2), 0.25)) and float(first.sum()) == pytest.approx(1.0)
    assert float(first[2:].sum()) == 0.0 and float(first[:, 0].sum()) == 0.0
    # a box smaller than a patch: all mass on the patch holding its centre
    assert float(t[1].view(4, 4)[3, 3]) == pytest.approx(1.0)


def test_box_focus_term_pulls_attention_to_the_target():
    gt = torch.tensor([[0.5, 0.25, 0.4, 0.5]])
    logits = torch.zeros(1, 16, requires_grad=True)
    out = _outputs(torch.tensor([[0.5, 0.5, 0.2, 0.2]]))
    out["patch_logits"] = logits
    terms = DateCriterion()(out, _batch(gt))
    assert float(terms["box_focus"]) == pytest.approx(-torch.log(torch.tensor(1 / 16)).item())  # uniform start
    terms["box_focus"].backward()
    inside = focus_targets(gt, 16)[0] > 0
    assert bool((logits.grad[0, inside] < 0).all()) and bool((logits.grad[0, ~inside] > 0).all())


def test_pseudo_focus_targets_only_the_centre_patch_by_default_and_only_for_pseudo_boxes():
    box = torch.tensor([[0.5, 0.25, 0.4, 0.5]])                # centre (0.5, 0.25): patch row 1, column 2
    t = focus_targets(box, 16, centre_only=True)[0].view(4, 4)
    assert float(t[1, 2]) == 1.0 and float(t.sum()) == 1.0
    logits = torch.randn(1, 16)
    out = _outputs(torch.tensor([[0.5, 0.5, 0.2, 0.2]]))
    out["patch_logits"] = logits
    centre, whole = DateCriterion(), DateCriterion(pseudo_focus="box")
    ce_centre = float(torch.nn.functional.cross_entropy(logits, torch.tensor([1 * 4 + 2])))
    assert float(centre(out, _batch(box), pseudo=True)["pseudo_box_focus"]) == pytest.approx(ce_centre)
    assert float(whole(out, _batch(box), pseudo=True)["pseudo_box_focus"]) != pytest.approx(ce_centre)
    # annotated (source) boxes keep the whole-box target whatever the pseudo setting
    assert float(centre(out, _batch(box))["box_focus"]) == pytest.approx(float(whole(out, _batch(box))["box_focus"]))
    with pytest.raises(ValueError, match="pseudo focus"):
        DateCriterion(pseudo_focus="corner")
