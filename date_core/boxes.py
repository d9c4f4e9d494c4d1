"""Box formats and overlap measures (torch; every function works on any leading shape).

Formats: ``cxcywh`` (centre x, centre y, width, height) and ``xyxy`` (x1, y1, x2, y2). The model
predicts ``cxcywh`` in [0, 1] of the letterboxed square; overlap measures work in ``xyxy``.
IoU and GIoU are scale- and shift-invariant, so they are the same in the letterboxed frame and
in original pixels (see :mod:`date_core.imaging`).
"""
from __future__ import annotations

import torch
from torch import Tensor

_EPS = 1e-7


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``[..., 4]`` (cx, cy, w, h) -> ``[..., 4]`` (x1, y1, x2, y2)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``[..., 4]`` (x1, y1, x2, y2) -> ``[..., 4]`` (cx, cy, w, h)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


def box_area(boxes_xyxy: Tensor) -> Tensor:
    """``[..., 4]`` xyxy -> ``[...]`` area (0 for inverted boxes)."""
    return (boxes_xyxy[..., 2] - boxes_xyxy[..., 0]).clamp(min=0) * (
        boxes_xyxy[..., 3] - boxes_xyxy[..., 1]).clamp(min=0)


def _inter_union(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a) + box_area(b) - inter
    return inter, union


def box_iou(a_xyxy: Tensor, b_xyxy: Tensor) -> Tensor:
    """Element-wise IoU of two broadcastable ``[..., 4]`` xyxy tensors -> ``[...]``.

    Two degenerate (zero-area) boxes have IoU 0, never NaN.
    """
    inter, union = _inter_union(a_xyxy, b_xyxy)
    return inter / union.clamp(min=_EPS)


def generalized_box_iou(a_xyxy: Tensor, b_xyxy: Tensor) -> Tensor:
    """Element-wise GIoU (Rezatofighi et al., 2019) of broadcastable ``[..., 4]`` xyxy -> ``[...]``
    in [-1, 1]. Unlike IoU it still has a gradient when the boxes do not overlap, which is why
    the box loss uses ``1 - GIoU``."""
    inter, union = _inter_union(a_xyxy, b_xyxy)
    iou = inter / union.clamp(min=_EPS)
    lt = torch.minimum(a_xyxy[..., :2], b_xyxy[..., :2])
    rb = torch.maximum(a_xyxy[..., 2:], b_xyxy[..., 2:])
    wh = (rb - lt).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / hull.clamp(min=_EPS)


def candidate_boxes(boxes: Tensor, alt_boxes: Tensor | None = None,
                    alt_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Stack the main box and its alternatives as one candidate set per pair.

    ``boxes`` [B, 4], ``alt_boxes`` [B, M, 4], ``alt_mask`` [B, M] -> (``[B, 1+M, 4]`` candidates,
    ``[B, 1+M]`` bool validity; the main box is always valid).
    """
    cands = boxes[:, None, :]
    valid = torch.ones(boxes.shape[0], 1, dtype=torch.bool, device=boxes.device)
    if alt_boxes is not None and alt_boxes.numel() > 0:
        if alt_mask is None:
            raise ValueError("alt_boxes given without alt_mask")
        cands = torch.cat([cands, alt_boxes.to(boxes.dtype)], dim=1)
        valid = torch.cat([valid, alt_mask.bool()], dim=1)
    return cands, valid


def best_match_iou(pred_cxcywh: Tensor, boxes_cxcywh: Tensor, alt_boxes: Tensor | None = None,
                   alt_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """IoU of each prediction with its best-matching answer among ``box`` and ``alt_boxes``.

    ``pred_cxcywh`` [B, 4]; returns (``[B]`` best IoU, ``[B]`` index of the best candidate,
    0 = the main box).
    """
    cands, valid = candidate_boxes(boxes_cxcywh, alt_boxes, alt_mask)
    ious = box_iou(cxcywh_to_xyxy(pred_cxcywh)[:, None, :], cxcywh_to_xyxy(cands))
    ious = ious.masked_fill(~valid, -1.0)
    best, idx = ious.max(dim=1)
    return best.clamp(min=0.0), idx
