"""Query-blind baselines: how far grounding gets without reading the query.

- ``largest``: the largest product box in the image (an oracle detector that ignores the query);
- ``centre``: a box of the domain's median target size centred in the image (the best single
  constant box, roughly);
- ``random_product``: the expected score of picking one product box uniformly (1/n per image).

ProductWorld is only a grounding benchmark if these stay low: the design limits are
Acc@0.5 <= 0.65 on ``mall`` and <= 0.35 on ``live``.

For contrast, :func:`colour_reader` reads the query crudely (its colour word only) with the same
oracle boxes: it shows that the query is actionable from pixels, and how much the live camera
(colour cast, noise, blur, small targets) hurts even that simple reading.
"""
from __future__ import annotations

import io
import re
from typing import Sequence

import numpy as np
from PIL import Image

from .catalogue import COLOURS
from .render import Scene

#: Design limits on any query-blind baseline's Acc@0.5, per domain.
BLIND_LIMITS = {"mall": 0.65, "live": 0.35}


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two x1, y1, x2, y2 boxes."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def best_iou(pred: Sequence[float], row: dict) -> float:
    """IoU of ``pred`` with the row's best matching answer (``box`` or any ``alt_boxes``)."""
    return max(box_iou(pred, b) for b in [row["box"], *row["alt_boxes"]])


def _area(b: Sequence[float]) -> float:
    return (b[2] - b[0]) * (b[3] - b[1])


def blind_baselines(scenes: Sequence[Scene]) -> dict[str, dict[str, float]]:
    """Acc@0.5 and mIoU of each query-blind baseline over every row of ``scenes`` (one domain).

    Returns ``{baseline: {"acc@0.5": ..., "mIoU": ..., "pairs": n}}``.
    """
    rows = [(s, r) for s in scenes for r in s.rows]
    if not rows:
        raise ValueError("no rows to score")
    sizes = np.asarray([[r["box"][2] - r["box"][0], r["box"][3] - r["box"][1]] for _, r in rows])
    med_w, med_h = np.median(sizes, axis=0)
    ious: dict[str, list[float]] = {"largest": [], "centre": [], "random_product": []}
    hits: dict[str, list[float]] = {name: [] for name in ious}
    for scene, row in rows:
        boxes = [p.box for p in scene.products]
        cx, cy = scene.width / 2, scene.height / 2
        centre = (cx - med_w / 2, cy - med_h / 2, cx + med_w / 2, cy + med_h / 2)
        for name, pred in (("largest", max(boxes, key=_area)), ("centre", centre)):
            iou = best_iou(pred, row)
            ious[name].append(iou)
            hits[name].append(float(iou >= 0.5))
        # Expectation over a uniformly random product pick (exact, no sampling noise).
        per_box = [best_iou(b, row) for b in boxes]
        ious["random_product"].append(float(np.mean(per_box)))
        hits["random_product"].append(float(np.mean([i >= 0.5 for i in per_box])))
    return {name: {"acc@0.5": float(np.mean(hits[name])), "mIoU": float(np.mean(ious[name])),
                   "pairs": len(rows)} for name in ious}


def _named_colour(query: str) -> str | None:
    for name in COLOURS:
        if re.search(rf"\b{name}\b", query.lower()):
            return name
    return None


def colour_reader(scenes: Sequence[Scene]) -> dict[str, float]:
    """Acc@0.5 / mIoU of picking, among the oracle product boxes, the product whose dominant
    colour (per-channel median of the box's central half) is nearest in RGB to the colour the
    query names. Category, pattern and finish words are ignored."""
    ious, hits = [], []
    for scene in scenes:
        arr = np.asarray(Image.open(io.BytesIO(scene.rows[0]["image"])).convert("RGB"), np.float32)
        dominant = []
        for p in scene.products:
            x1, y1, x2, y2 = p.box
            cx1, cx2 = int(x1 + 0.25 * (x2 - x1)), int(np.ceil(x2 - 0.25 * (x2 - x1)))
            cy1, cy2 = int(y1 + 0.25 * (y2 - y1)), int(np.ceil(y2 - 0.25 * (y2 - y1)))
            dominant.append(np.median(arr[cy1:cy2, cx1:cx2].reshape(-1, 3), axis=0))
        for row in scene.rows:
            name = _named_colour(row["query"])
            if name is None:
                raise ValueError(f"query names no colour: {row['query']!r}")
            want = np.asarray(COLOURS[name], np.float32)
            pick = int(np.argmin([np.linalg.norm(d - want) for d in dominant]))
            iou = best_iou(scene.products[pick].box, row)
            ious.append(iou)
            hits.append(float(iou >= 0.5))
    return {"acc@0.5": float(np.mean(hits)), "mIoU": float(np.mean(ious)), "pairs": len(hits)}


def scene_stats(scenes: Sequence[Scene]) -> dict[str, float]:
    """Descriptive statistics of a sample of one domain (what the tests and the report check)."""
    rows = [(s, r) for s in scenes for r in s.rows]
    rel_side = [np.sqrt(_area(r["box"])) / min(s.width, s.height) for s, r in rows]
    shares = []
    for s, r in rows:
        target = next(p for p in s.products if list(p.box) == r["box"])
        others = [p.item for p in s.products if p is not target]
        shares.append(any(o.category == target.item.category or o.colour == target.item.colour
                          for o in others))
    return {
        "images": len(scenes),
        "pairs": len(rows),
        "rows_per_image": len(rows) / max(1, len(scenes)),
        "products_per_image": float(np.mean([len(s.products) for s in scenes])),
        "target_side_rel": float(np.mean(rel_side)),
        "target_side_rel_p05": float(np.percentile(rel_side, 5)),
        "target_side_px": float(np.mean([np.sqrt(_area(r["box"])) for _, r in rows])),
        "target_area_frac": float(np.mean([_area(r["box"]) / (s.width * s.height) for s, r in rows])),
        "share_category_or_colour": float(np.mean(shares)),
        "with_alt_boxes": float(np.mean([bool(r["alt_boxes"]) for _, r in rows])),
    }
