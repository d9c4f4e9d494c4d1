"""Product Retrieval (PR) and Product Grounding (PG) metrics, vectorised in torch.

Names (callers prefix a split tag, e.g. ``live_test/pg/acc@0.5``): ``pr/R@1``, ``pr/R@5``,
``pr/R@10``, ``pr/mAP@10``, ``pg/mIoU``, ``pg/acc@0.3``, ``pg/acc@0.5``, ``pg/acc@0.7``.

Conventions:
- Retrieval ranks a gallery of *unique* images (see :func:`dedupe_gallery`); a gallery image is
  relevant to a query when it shows the same product (``item_key``). An image carrying several
  queries shows several products: it is relevant to the items of all its pairs.
- ``R@K`` is the fraction of queries with at least one relevant image in the top K.
- ``mAP@10`` averages ``AP@10 = sum_i P@i * rel_i / min(n_relevant, 10)`` over queries.
- Ties in similarity are broken *pessimistically* (irrelevant images rank first among equal
  scores), so a constant scorer gets no credit from the gallery's order.
- Queries with no relevant image in the gallery are left out of PR (and counted in
  ``pr/n_queries_without_relevant``); if none is left, the PR metrics are NaN.
- Grounding: a prediction's IoU is its best over ``box`` and the valid ``alt_boxes``;
  ``acc@t`` counts IoU >= t.
- Metrics written as JSON go through :func:`metrics_json` (:func:`json_safe`): a NaN or
  infinite value (no labelled boxes, no relevant image) is written as ``null``, never as the
  ``NaN`` / ``Infinity`` tokens that strict JSON parsers reject.
"""
from __future__ import annotations

import json
import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from date_core.boxes import best_match_iou

PR_KS = (1, 5, 10)
MAP_K = 10
PG_THRESHOLDS = (0.3, 0.5, 0.7)
PR_NAMES = tuple(f"pr/R@{k}" for k in PR_KS) + (f"pr/mAP@{MAP_K}",)
PG_NAMES = ("pg/mIoU",) + tuple(f"pg/acc@{t}" for t in PG_THRESHOLDS)
METRIC_NAMES = PR_NAMES + PG_NAMES


def _t(x, dtype=None) -> Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
    return t.to(dtype) if dtype is not None else t


def _ordered_int(scores: Tensor) -> Tensor:
    """float32 -> int64 with the same order (IEEE-754 bit trick); -0.0 and 0.0 map equal."""
    bits = (scores.float() + 0.0).view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)


def topk_relevance(query_emb: Tensor, query_item: Tensor, gallery_emb: Tensor, gallery_item: Tensor,
                   k: int, chunk: int = 8192) -> tuple[Tensor, Tensor]:
    """Relevance of each query's top-k gallery images, in rank order, plus its relevant count.

    ``query_emb [Q, D]``, ``gallery_emb [G, D]``, item keys ``[Q]`` and ``[G]`` or ``[G, M]``
    (an image showing several items; pad with -1). The gallery is
    scored ``chunk`` images at a time, so memory is ``O(Q * (chunk + k))``. Returns
    (``[Q, min(k, G)]`` bool, ``[Q]`` int64 number of relevant gallery images).
    """
    q_emb, g_emb = query_emb.float(), gallery_emb.float()
    q_item, g_item = _t(query_item).long(), _t(gallery_item).long()
    if g_item.dim() == 1:
        g_item = g_item[:, None]
    k = min(k, g_emb.shape[0])
    best_key = torch.empty(q_emb.shape[0], 0, dtype=torch.long)
    best_rel = torch.empty(q_emb.shape[0], 0, dtype=torch.bool)
    n_rel = torch.zeros(q_emb.shape[0], dtype=torch.long)
    for start in range(0, g_emb.shape[0], chunk):
        sims = q_emb @ g_emb[start:start + chunk].t()
        rel = (q_item[:, None, None] == g_item[None, start:start + chunk]).any(dim=-1)
        n_rel += rel.sum(dim=1)
        # one int64 key orders by score, then irrelevant-before-relevant among equal scores
        key = _ordered_int(sims) * 2 + (~rel).long()
        key = torch.cat([best_key, key], dim=1)
        rel = torch.cat([best_rel, rel], dim=1)
        best_key, idx = key.topk(min(k, key.shape[1]), dim=1)
        best_rel = rel.gather(1, idx)
    return best_rel, n_rel


def retrieval_metrics(query_emb, query_item, gallery_emb, gallery_item, chunk: int = 8192) -> dict[str, float]:
    """``pr/R@1``, ``pr/R@5``, ``pr/R@10``, ``pr/mAP@10`` (+ counts) for queries vs a gallery."""
    q_emb, g_emb = _t(query_emb, torch.float32), _t(gallery_emb, torch.float32)
    if q_emb.shape[0] == 0 or g_emb.shape[0] == 0:
        raise ValueError("retrieval metrics need at least one query and one gallery image")
    rel, n_rel = topk_relevance(q_emb, query_item, g_emb, gallery_item, max(max(PR_KS), MAP_K), chunk)
    keep = n_rel > 0
    out = {"pr/n_queries": float(q_emb.shape[0]), "pr/n_gallery": float(g_emb.shape[0]),
           "pr/n_queries_without_relevant": float((~keep).sum())}
    if not bool(keep.any()):
        out.update({name: float("nan") for name in PR_NAMES})
        return out
    rel, n_rel = rel[keep].float(), n_rel[keep]
    for k in PR_KS:
        out[f"pr/R@{k}"] = float(rel[:, :k].amax(dim=1).mean())
    out[f"pr/mAP@{MAP_K}"] = float(average_precision_at_k(rel, n_rel, MAP_K).mean())
    return out


def average_precision_at_k(rel: Tensor, n_relevant: Tensor, k: int) -> Tensor:
    """Truncated average precision of each ranking: ``AP@k = sum_{i<=k} P@i * rel_i / min(n_relevant, k)``.

    ``rel [Q, R]`` (bool or 0/1) relevance of each query's ranked gallery items, best first
    (only the first ``k`` columns count); ``n_relevant [Q]`` relevant items in the whole
    gallery (> 0). Returns ``[Q]`` float32. A ranking that finds every relevant item (or fills
    the top k with them) scores 1.
    """
    top = rel[:, :k].float()
    ranks = torch.arange(1, top.shape[1] + 1, dtype=torch.float32)
    precision = top.cumsum(dim=1) / ranks
    return (precision * top).sum(dim=1) / _t(n_relevant).clamp(max=k).float()


def dedupe_gallery(image_emb, image_key, item_key) -> tuple[Tensor, Tensor, Tensor]:
    """One gallery row per image (its first row), with every item its pairs name.

    ``image_emb [N, D]``, keys ``[N]`` -> (``[G, D]`` embeddings, ``[G]`` image keys, ``[G, M]``
    item keys of each image, padded with -1; M = most distinct items on one image), in order of
    first appearance.
    """
    emb, img, item = _t(image_emb), _t(image_key).long(), _t(item_key).long()
    n = img.shape[0]
    uniq, inverse = torch.unique(img, return_inverse=True)
    first = torch.full((uniq.shape[0],), n, dtype=torch.long)
    first = first.scatter_reduce(0, inverse, torch.arange(n), reduce="amin")
    order = first.argsort()                      # unique index, in order of first appearance
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.shape[0])   # unique index -> gallery row
    pairs = torch.unique(torch.stack([rank[inverse], item], dim=1), dim=0)  # distinct (row, item), sorted
    start = torch.searchsorted(pairs[:, 0].contiguous(), torch.arange(order.shape[0]))
    slot = torch.arange(pairs.shape[0]) - start[pairs[:, 0]]
    items = torch.full((order.shape[0], int(slot.max()) + 1 if n else 1), -1, dtype=torch.long)
    items[pairs[:, 0], slot] = pairs[:, 1]
    return emb[first[order]], uniq[order], items


def grounding_metrics(pred_boxes, boxes, alt_boxes=None, alt_mask=None,
                      thresholds: Sequence[float] = PG_THRESHOLDS) -> dict[str, float]:
    """``pg/mIoU`` and ``pg/acc@t`` for predictions vs answers, all ``cxcywh`` (any one frame),
    and ``pg/area_ratio``: the geometric mean over pairs of predicted / target box area (1 =
    sizes right on average; a diagnostic of a size shift between domains, not a score).

    ``pred_boxes, boxes [B, 4]``, ``alt_boxes [B, M, 4]``, ``alt_mask [B, M]``.
    """
    pred, gt = _t(pred_boxes, torch.float32), _t(boxes, torch.float32)
    if pred.shape != gt.shape or pred.dim() != 2 or pred.shape[-1] != 4:
        raise ValueError(f"pred_boxes {tuple(pred.shape)} and boxes {tuple(gt.shape)} must both be [B, 4]")
    out = {"pg/n_boxes": float(pred.shape[0])}
    if pred.shape[0] == 0:
        out.update({name: float("nan") for name in PG_NAMES})
        out["pg/area_ratio"] = float("nan")
        return out
    area = lambda b: (b[:, 2] * b[:, 3]).clamp_min(1e-8)  # noqa: E731 (cxcywh: w * h)
    out["pg/area_ratio"] = float(torch.log(area(pred) / area(gt)).mean().exp())
    alt = None if alt_boxes is None else _t(alt_boxes, torch.float32)
    mask = None if alt_mask is None else _t(alt_mask).bool()
    iou, _ = best_match_iou(pred, gt, alt, mask)
    out["pg/mIoU"] = float(iou.mean())
    for t in thresholds:
        out[f"pg/acc@{t}"] = float((iou >= t).float().mean())
    return out


def prefixed(metrics: dict[str, float], tag: str) -> dict[str, float]:
    """``{"pg/mIoU": x}`` -> ``{"<tag>/pg/mIoU": x}`` (e.g. ``tag="live_test"``)."""
    return {f"{tag}/{k}": v for k, v in metrics.items()}


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN / infinite float (Python, numpy or 0-d tensor) replaced by ``None``,
    numpy / torch scalars turned into Python numbers and arrays / tuples into lists, recursing
    through dicts, lists and tuples; anything else is returned as is."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    return obj


def metrics_json(obj: Any, **kwargs: Any) -> str:
    """Strict JSON text of ``obj`` after :func:`json_safe` (NaN / inf -> ``null``). Dumped with
    ``allow_nan=False`` so that a value that slips past ``json_safe`` fails loudly instead of
    writing invalid JSON. ``kwargs`` go to :func:`json.dumps` (e.g. ``indent=2``)."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)
