"""Metrics against hand-computed cases; box formats; IoU / GIoU and their gradients."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from date_core.boxes import (box_iou, cxcywh_to_xyxy, generalized_box_iou, xyxy_to_cxcywh)
from date_core.imaging import Letterbox, letterbox_cxcywh_to_xyxy_pixels, xyxy_pixels_to_letterbox_cxcywh
from date_core.evaluation.metrics import (METRIC_NAMES, dedupe_gallery, grounding_metrics, prefixed,
                               retrieval_metrics, topk_relevance)

# gallery = unit vectors, so a query vector *is* its score list over the gallery
GALLERY = torch.eye(4)
GALLERY_ITEMS = torch.tensor([10, 11, 10, 12])  # items A, B, A, C


def test_metric_names_are_the_contract():
    assert METRIC_NAMES == ("pr/R@1", "pr/R@5", "pr/R@10", "pr/mAP@10",
                            "pg/mIoU", "pg/acc@0.3", "pg/acc@0.5", "pg/acc@0.7")
    assert prefixed({"pg/mIoU": 0.5}, "live_test") == {"live_test/pg/mIoU": 0.5}


@pytest.mark.parametrize("chunk", [1, 3, 8192])
def test_retrieval_hand_computed_with_ties_and_empty_relevance(chunk):
    queries = torch.tensor([
        [0.9, 0.1, 0.5, 0.3],   # item A: relevant at ranks 1 and 2 -> R@1 = 1, AP = (1 + 1) / 2 = 1
        [0.9, 0.1, 0.5, 0.3],   # item B: relevant at rank 4 -> R@1 = 0, R@5 = 1, AP = (1/4) / 1
        [0.2, 0.2, 0.2, 0.2],   # item C, all tied: pessimistic -> rank 4, AP = 1/4
        [0.0, 1.0, 0.0, 0.0],   # item D: not in the gallery -> left out
    ])
    items = torch.tensor([10, 11, 12, 13])
    m = retrieval_metrics(queries, items, GALLERY, GALLERY_ITEMS, chunk=chunk)
    assert m["pr/R@1"] == pytest.approx(1 / 3)
    assert m["pr/R@5"] == pytest.approx(1.0) and m["pr/R@10"] == pytest.approx(1.0)
    assert m["pr/mAP@10"] == pytest.approx((1 + 0.25 + 0.25) / 3)
    assert m["pr/n_queries_without_relevant"] == 1 and m["pr/n_gallery"] == 4


def test_tie_between_relevant_and_irrelevant_counts_against_the_model():
    q = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    m = retrieval_metrics(q, torch.tensor([10]), GALLERY, torch.tensor([10, 11, 12, 13]))
    assert m["pr/R@1"] == 0.0 and m["pr/mAP@10"] == pytest.approx(0.5)
    # the same holds whichever side of the tie comes first in the gallery
    m = retrieval_metrics(q, torch.tensor([11]), GALLERY, torch.tensor([10, 11, 12, 13]))
    assert m["pr/R@1"] == 0.0


def test_recall_at_10_and_map_with_a_larger_gallery():
    g = torch.eye(12)
    scores = torch.linspace(1.0, 0.0, 12)[None]  # gallery row i ranks i + 1
    items = torch.arange(12)
    items_q = torch.tensor([6])                   # relevant at rank 7
    m = retrieval_metrics(scores, items_q, g, items)
    assert (m["pr/R@1"], m["pr/R@5"], m["pr/R@10"]) == (0.0, 0.0, 1.0)
    assert m["pr/mAP@10"] == pytest.approx(1 / 7)
    # two relevant at ranks 2 and 11: AP@10 = (1/2) / min(2, 10); rank 11 is outside the cut
    items2 = items.clone()
    items2[10] = 1
    m = retrieval_metrics(scores, torch.tensor([1]), g, items2)
    assert m["pr/mAP@10"] == pytest.approx(0.25) and m["pr/R@1"] == 0.0 and m["pr/R@5"] == 1.0


def test_no_relevant_anywhere_gives_nan_not_zero():
    m = retrieval_metrics(torch.eye(2), torch.tensor([98, 99]), GALLERY[:, :2], torch.tensor([1, 2, 3, 4]))
    assert all(math.isnan(m[k]) for k in ("pr/R@1", "pr/mAP@10"))
    assert m["pr/n_queries_without_relevant"] == 2


def test_chunked_topk_matches_a_full_sort_on_random_data():
    g = torch.Generator().manual_seed(0)
    q, gal = torch.randn(50, 16, generator=g), torch.randn(1000, 16, generator=g)
    q_items, g_items = torch.randint(0, 30, (50,), generator=g), torch.randint(0, 30, (1000,), generator=g)
    rel, n_rel = topk_relevance(q, q_items, gal, g_items, k=10, chunk=97)
    order = (q @ gal.t()).argsort(dim=1, descending=True)[:, :10]
    torch.testing.assert_close(rel, g_items[order] == q_items[:, None])
    torch.testing.assert_close(n_rel, (q_items[:, None] == g_items[None]).sum(1))


def test_dedupe_gallery_keeps_first_row_per_image_with_all_its_items():
    emb = torch.arange(5.0)[:, None]
    e, img, items = dedupe_gallery(emb, torch.tensor([5, 3, 5, 7, 3]), torch.tensor([1, 2, 9, 4, 2]))
    assert e.flatten().tolist() == [0.0, 1.0, 3.0]
    assert img.tolist() == [5, 3, 7]
    # image 5 carries two queries about items 1 and 9; image 3's two queries share item 2
    assert items.tolist() == [[1, 9], [2, -1], [4, -1]]


def test_an_image_is_relevant_to_every_item_its_pairs_name():
    # two pairs on one image (items 1 and 9), one pair on another (item 4)
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    g_emb, _, g_items = dedupe_gallery(emb, torch.tensor([50, 50, 60]), torch.tensor([1, 9, 4]))
    queries = torch.tensor([[1.0, 0.1], [1.0, 0.1], [0.1, 1.0]])
    m = retrieval_metrics(queries, torch.tensor([1, 9, 4]), g_emb, g_items)
    assert m["pr/R@1"] == 1.0 and m["pr/n_gallery"] == 2


def test_grounding_hand_computed_with_alt_boxes_and_threshold_boundary():
    gt = torch.tensor([[0.5, 0.5, 0.2, 0.2],      # pred == gt                 -> IoU 1
                       [0.5, 0.5, 0.2, 0.2],      # shifted by half a width    -> IoU 1/3
                       [0.25, 0.125, 0.5, 0.25],  # pred inside, half the area -> IoU exactly 0.5
                       [0.2, 0.2, 0.1, 0.1],      # pred equals the valid alt box    -> IoU 1
                       [0.2, 0.2, 0.1, 0.1]])     # pred equals a MASKED alt box     -> IoU 0
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2],
                         [0.6, 0.5, 0.2, 0.2],
                         [0.125, 0.125, 0.25, 0.25],
                         [0.8, 0.8, 0.1, 0.1],
                         [0.8, 0.8, 0.1, 0.1]])
    alt = torch.zeros(5, 2, 4)
    alt[3, 1] = alt[4, 1] = torch.tensor([0.8, 0.8, 0.1, 0.1])
    mask = torch.zeros(5, 2)
    mask[3, 1] = 1.0
    m = grounding_metrics(pred, gt, alt, mask)
    ious = [1.0, 1 / 3, 0.5, 1.0, 0.0]
    assert m["pg/mIoU"] == pytest.approx(sum(ious) / 5, abs=1e-6)
    assert m["pg/acc@0.3"] == pytest.approx(4 / 5)
    assert m["pg/acc@0.5"] == pytest.approx(3 / 5)   # 0.5 itself counts
    assert m["pg/acc@0.7"] == pytest.approx(2 / 5)
    # sizes: only the third prediction is off (half the target's area) -> geometric mean 0.5^(1/5)
    assert m["pg/area_ratio"] == pytest.approx(0.5 ** 0.2, rel=1e-5)
    shrunk = gt.clone()
    shrunk[:, 2:] *= 0.5   # every box at half width and height, wherever it is: a quarter of the area
    assert grounding_metrics(shrunk, gt)["pg/area_ratio"] == pytest.approx(0.25, rel=1e-5)
    # numpy in, same answer; and no alt boxes at all
    assert grounding_metrics(pred.numpy(), gt.numpy(), alt.numpy(), mask.numpy()) == m
    assert grounding_metrics(pred, gt)["pg/acc@0.5"] == pytest.approx(2 / 5)


def test_grounding_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[B, 4\]"):
        grounding_metrics(torch.zeros(3, 4), torch.zeros(2, 4))


def test_box_format_round_trips():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(20, 2, generator=g)
    boxes = torch.cat([xy, xy + torch.rand(20, 2, generator=g)], dim=1)
    torch.testing.assert_close(cxcywh_to_xyxy(xyxy_to_cxcywh(boxes)), boxes)
    # original pixels -> letterbox cxcywh -> original pixels, for wide, tall and square frames
    for w, h in [(640, 360), (300, 900), (128, 128)]:
        lb = Letterbox(float(w), float(h), 96)
        px = np.array([[10.0, 20.0, w / 2, h - 5.0], [0.0, 0.0, w, h]])
        back = letterbox_cxcywh_to_xyxy_pixels(xyxy_pixels_to_letterbox_cxcywh(px, lb), lb)
        np.testing.assert_allclose(back, px, atol=1e-3)


def test_iou_and_giou_values():
    a = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert float(box_iou(a, a)) == pytest.approx(1.0) and float(generalized_box_iou(a, a)) == pytest.approx(1.0)
    far = torch.tensor([2.0, 0.0, 3.0, 1.0])  # disjoint: IoU 0, hull 3, union 2 -> GIoU = -1/3
    assert float(box_iou(a, far)) == 0.0
    assert float(generalized_box_iou(a, far)) == pytest.approx(-1 / 3)
    point = torch.tensor([0.5, 0.5, 0.5, 0.5])  # degenerate boxes give numbers, not NaN
    assert torch.isfinite(generalized_box_iou(point, point)) and float(box_iou(point, point)) == 0.0


def test_giou_gradient_pulls_a_disjoint_box_towards_its_target():
    target = torch.tensor([0.7, 0.5, 0.2, 0.2])
    pred = torch.tensor([0.2, 0.5, 0.2, 0.2], requires_grad=True)
    iou = box_iou(cxcywh_to_xyxy(pred.detach()), cxcywh_to_xyxy(target))
    assert float(iou) == 0.0  # IoU alone gives no signal here ...
    loss = 1 - generalized_box_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(target))
    loss.backward()
    assert bool(torch.isfinite(pred.grad).all())
    assert float(pred.grad[0]) < 0  # ... GIoU does: descending the loss moves the centre right
    # gradient descent on the box loss the model uses (L1 + GIoU) closes the gap
    p = pred.detach().clone().requires_grad_(True)
    opt = torch.optim.SGD([p], lr=0.001)
    for _ in range(2000):
        opt.zero_grad()
        giou = generalized_box_iou(cxcywh_to_xyxy(p), cxcywh_to_xyxy(target))
        (5 * (p - target).abs().sum() + 2 * (1 - giou)).backward()
        opt.step()
    assert float(box_iou(cxcywh_to_xyxy(p.detach()), cxcywh_to_xyxy(target))) > 0.8
