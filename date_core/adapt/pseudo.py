"""The pseudo box generator of PG-DA.

Labelling a target set is two steps, because one signal needs the whole set:

1. :func:`predict_views` (per batch; a Ray Data actor pool maps it over the target set):
   the model predicts on several augmented views, the boxes are mapped back to the original
   square, and a consensus box, the views' agreement and confidence and the pair's retrieval
   embeddings come back as numpy arrays.
2. :func:`score_and_select` (global, on the concatenated per-pair arrays): retrieval
   consistency (does the query find its own image among the top-k of the whole target
   gallery, computed in chunks), the reliability, and the kept mask for the round.

:func:`build_pseudo_labels` turns the kept pairs into the pseudo-label rows (box, weight).

The consensus box is the coordinate-wise median of the mapped-back boxes in xyxy: with
three or more views one wrong view (a flip the model reads differently) cannot drag an edge,
whereas a mean moves every edge by a third of the outlier's error; the median of each edge
keeps ``x1 <= x2`` (order statistics are monotone), so it is always a valid box. Agreement
still sees the outlier, so such a pair scores lower. ``consensus='mean'`` is offered.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch

from .. import batch as B
from ..boxes import box_iou, cxcywh_to_xyxy, xyxy_to_cxcywh
from ..config import config_section
from .views import Compose, Focus, Identity, View

RELIABILITY_SIGNALS = ("agreement", "confidence", "retrieval", "sensitivity")
CONSENSUS_KINDS = ("median", "mean")


def kept_fraction(schedule: Sequence[float], round_index: int) -> float:
    """Fraction of target pairs kept after labelling round ``round_index`` (0-based); the
    schedule's last value repeats for later rounds."""
    if isinstance(schedule, (int, float)):
        schedule = [schedule]
    if len(schedule) == 0:
        raise ValueError("adapt.keep_schedule is empty")
    if round_index < 0:
        raise ValueError(f"round index must be >= 0, got {round_index}")
    for f in schedule:
        if not 0.0 <= float(f) <= 1.0:
            raise ValueError(f"adapt.keep_schedule values must lie in [0, 1], got {list(schedule)}")
    return float(schedule[min(round_index, len(schedule) - 1)])


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def swap_partners(item_key: np.ndarray, image_key: np.ndarray | None = None) -> np.ndarray:
    """For each pair, another pair of the batch whose query names a different product ->
    index ``[N]`` (-1 where the batch has none). A query of another product shown in the *same*
    image is preferred (a model that reads the query must then move its box to that product);
    otherwise the next pair with a different product, cyclically."""
    item_key = np.asarray(item_key)
    n = item_key.shape[0]
    image_key = np.arange(n) if image_key is None else np.asarray(image_key)
    partner = np.full(n, -1, dtype=np.int64)
    for i in range(n):
        other = item_key != item_key[i]
        same_image = np.flatnonzero(other & (image_key == image_key[i]))
        if same_image.size:
            partner[i] = same_image[0]
            continue
        cand = np.flatnonzero(other)
        if cand.size:
            after = cand[cand > i]
            partner[i] = after[0] if after.size else cand[0]
    return partner


@torch.no_grad()
def predict_views(model: torch.nn.Module, batch: Mapping[str, Any], views: Sequence[View],
                  consensus: str = "median", keep_annotations: bool = False,
                  sensitivity: bool = True, focus_zoom: float | None = None) -> dict[str, np.ndarray]:
    """Predict one target batch under every view; the per-pair part of pseudo-labelling.

    Args:
        model: the DATE model (``model(pixel_values, input_ids, attention_mask)`` -> dict with
            ``pred_boxes [B, 4]`` cxcywh, ``pred_conf [B]``, ``image_emb``/``query_emb [B, D]``).
            Run in eval mode here; its mode is restored afterwards.
        batch: a batch (see :mod:`date_core.batch`) as tensors or numpy arrays.
        views: the views (see :func:`date_core.adapt.views.build_views`).
        consensus: ``median`` (default) or ``mean`` of the mapped-back xyxy boxes.
        keep_annotations: also pass the batch's hidden target annotations through as
            ``gt_boxes``, ``gt_has_box``, ``gt_alt_boxes``, ``gt_alt_mask`` to *monitor*
            pseudo-label precision; nothing in the selection reads them.
        sensitivity: also ground each image with another product's query (see
            :func:`swap_partners`; needs ``item_key``) and return ``sensitivity [N]`` =
            1 - IoU(own box, swapped box): a box that does not move is not reading the query.
            0 where the batch holds no other product. One extra forward pass.
        focus_zoom: zoom in (``> 1``) about each pair's first box centre before the views, so
            every view sees the product about ``focus_zoom`` times larger (:class:`~.views.Focus`);
            boxes map back exactly. Why: a seeker trained on the source draws target products
            that are smaller than the source's at source sizes (too big); zoomed in, the first
            teacher's boxes are right more often (docs/experiments.md). One extra forward pass
            (the first guess).
    Returns numpy arrays (N = batch size, V = number of views):
        ``view_boxes [N, V, 4]`` cxcywh in the original square, clipped to [0, 1];
        ``box [N, 4]`` consensus, cxcywh; ``agreement [N]`` mean pairwise IoU of the views'
        boxes (1 with a single view); ``confidence [N]`` mean ``pred_conf`` over views;
        ``image_emb``/``query_emb [N, D]`` from the unaugmented, unzoomed image; and ``pair_key``,
        ``image_key``, ``orig_size`` passed through when the batch has them.
    """
    if consensus not in CONSENSUS_KINDS:
        raise ValueError(f"unknown consensus {consensus!r}; choose one of {CONSENSUS_KINDS}")
    if not views:
        raise ValueError("predict_views needs at least one view")
    for key in (B.PIXEL_VALUES, B.INPUT_IDS, B.ATTENTION_MASK):
        if key not in batch:
            raise KeyError(f"batch lacks {key!r}")
    device = _model_device(model)
    pixels = torch.as_tensor(batch[B.PIXEL_VALUES]).to(device=device, dtype=torch.float32)
    ids = torch.as_tensor(batch[B.INPUT_IDS]).to(device=device, dtype=torch.long)
    mask = torch.as_tensor(batch[B.ATTENTION_MASK]).to(device=device, dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        full = None  # the unaugmented image's outputs, computed at most once
        focus = None
        if focus_zoom:
            full = model(pixels, ids, mask)
            focus = Focus(float(focus_zoom), full["pred_boxes"].float()[:, :2])
        boxes, confs = [], []
        for view in views:
            seen = view if focus is None else Compose([focus, view])
            out = model(seen.apply(pixels), ids, mask)
            boxes.append(seen.boxes_to_original(out["pred_boxes"].float()))
            confs.append(out["pred_conf"].float())
            if full is None and isinstance(view, Identity):
                full = out
        if full is None:
            full = model(pixels, ids, mask)
        emb = (full["image_emb"], full["query_emb"])
        sens = None
        if sensitivity and B.ITEM_KEY in batch:
            partner = swap_partners(np.asarray(torch.as_tensor(batch[B.ITEM_KEY]).cpu()),
                                    None if B.IMAGE_KEY not in batch else np.asarray(torch.as_tensor(batch[B.IMAGE_KEY]).cpu()))
            found = torch.from_numpy(partner >= 0).to(device)
            idx = torch.from_numpy(np.where(partner >= 0, partner, np.arange(partner.shape[0]))).to(device)
            # both boxes on the whole image: does the box move when the query changes?
            own = cxcywh_to_xyxy(full["pred_boxes"].float())
            swapped = cxcywh_to_xyxy(model(pixels, ids[idx], mask[idx])["pred_boxes"].float())
            sens = torch.where(found, 1.0 - box_iou(own.clamp(0, 1), swapped.clamp(0, 1)), torch.zeros_like(found, dtype=torch.float32))
    finally:
        model.train(was_training)
    view_xyxy = cxcywh_to_xyxy(torch.stack(boxes, dim=1)).clamp(0.0, 1.0)        # [N, V, 4]
    n, v = view_xyxy.shape[:2]
    if v > 1:
        i, j = torch.triu_indices(v, v, offset=1, device=view_xyxy.device)
        agreement = box_iou(view_xyxy[:, i], view_xyxy[:, j]).mean(dim=1)
    else:
        agreement = view_xyxy.new_ones(n)
    # quantile, not Tensor.median: with an even number of views it averages the two middle values
    # instead of taking the lower one (which would shrink the box towards the top-left).
    cons = view_xyxy.quantile(0.5, dim=1) if consensus == "median" else view_xyxy.mean(dim=1)
    result = {
        "view_boxes": xyxy_to_cxcywh(view_xyxy).cpu().numpy().astype(np.float32),
        "box": xyxy_to_cxcywh(cons).cpu().numpy().astype(np.float32),
        "agreement": agreement.cpu().numpy().astype(np.float32),
        "confidence": torch.stack(confs, dim=1).mean(dim=1).cpu().numpy().astype(np.float32),
        "image_emb": emb[0].float().cpu().numpy(),
        "query_emb": emb[1].float().cpu().numpy(),
    }
    if sens is not None:
        result["sensitivity"] = sens.cpu().numpy().astype(np.float32)
    for key in (B.PAIR_KEY, B.IMAGE_KEY, B.ORIG_SIZE):
        if key in batch:
            result[key] = np.asarray(torch.as_tensor(batch[key]).cpu().numpy())
    if keep_annotations:
        for key in (B.BOXES, B.HAS_BOX, B.ALT_BOXES, B.ALT_MASK):
            if key in batch:
                result[f"gt_{key}"] = np.asarray(torch.as_tensor(batch[key]).cpu().numpy())
    return result


def concat_predictions(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate :func:`predict_views` outputs of several batches along the pair axis."""
    if not parts:
        raise ValueError("no predictions to concatenate")
    keys = set(parts[0])
    for p in parts[1:]:
        if set(p) != keys:
            raise ValueError(f"prediction batches have different keys: {sorted(keys)} vs {sorted(p)}")
    return {k: np.concatenate([np.asarray(p[k]) for p in parts], axis=0) for k in parts[0]}


def retrieval_hits(query_emb: np.ndarray, image_emb: np.ndarray, image_key: np.ndarray, k: int,
                   chunk_size: int = 4096) -> np.ndarray:
    """Whether each query's own image is in its top-``k`` over the whole gallery -> bool ``[N]``.

    The gallery is the distinct images (``image_key`` dedups queries sharing an image). Scores
    are dot products (the embeddings are L2-normalised). Queries are scored in chunks so memory
    stays ``chunk_size x gallery``. A rank counts the gallery images scoring strictly higher
    than the own image, so ties resolve in the pair's favour.
    """
    query_emb = np.asarray(query_emb, dtype=np.float32)
    image_emb = np.asarray(image_emb, dtype=np.float32)
    image_key = np.asarray(image_key)
    n = query_emb.shape[0]
    if image_emb.shape[0] != n or image_key.shape[0] != n:
        raise ValueError("query_emb, image_emb and image_key must have one row per pair")
    if k < 1:
        raise ValueError(f"retrieval top-k must be >= 1, got {k}")
    uniq, first, own_index = np.unique(image_key, return_index=True, return_inverse=True)
    gallery = image_emb[first]                                                   # [G, D]
    hits = np.zeros(n, dtype=bool)
    for start in range(0, n, chunk_size):
        q = query_emb[start:start + chunk_size]
        scores = q @ gallery.T                                                   # [c, G]
        own = scores[np.arange(q.shape[0]), own_index[start:start + chunk_size]]
        rank = (scores > own[:, None]).sum(axis=1)
        hits[start:start + chunk_size] = rank < k
    return hits


def score_and_select(pred: Mapping[str, np.ndarray], round_index: int, cfg_adapt: Mapping[str, Any]
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Reliability of every target pair and the kept mask of this labelling round.

    ``reliability = sum_s w_s * signal_s / sum_s w_s`` over the signals ``agreement``,
    ``confidence``, ``sensitivity`` (all in [0, 1]) and ``retrieval`` (1 when the query
    retrieves its own image in the top ``retrieval_topk`` of the whole target gallery), with
    weights ``cfg_adapt['reliability']``. The ``kept_fraction(keep_schedule, round_index)`` most
    reliable pairs are kept, except pairs at or below ``min_reliability`` (default 0), which
    are never kept.

    Args:
        pred: :func:`concat_predictions` of the whole target set (``agreement``,
            ``confidence`` and, when retrieval's weight is > 0, ``query_emb``, ``image_emb``,
            ``image_key``).
        round_index: 0-based labelling round.
        cfg_adapt: the ``adapt`` config section, or part of it (the rest from ``default.yaml``):
            ``keep_schedule``, ``reliability``, ``retrieval_topk``, ``min_reliability``,
            ``search_chunk``.
    Returns:
        ``(reliability float32 [N] in [0, 1], keep bool [N])``.
    """
    cfg_adapt = config_section("adapt", cfg_adapt)
    weights = {s: float(w) for s, w in dict(cfg_adapt["reliability"]).items()}
    unknown = set(weights) - set(RELIABILITY_SIGNALS)
    if unknown:
        raise ValueError(f"unknown reliability signals {sorted(unknown)}; choose from {RELIABILITY_SIGNALS}")
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"adapt.reliability weights must be >= 0 with a positive sum, got {weights}")
    agreement = np.asarray(pred["agreement"], dtype=np.float64)
    n = agreement.shape[0]
    signals = {"agreement": agreement, "confidence": np.clip(np.asarray(pred["confidence"], dtype=np.float64), 0, 1)}
    if weights.get("sensitivity", 0.0) > 0:
        if "sensitivity" not in pred:
            raise ValueError("adapt.reliability weighs 'sensitivity' but the predictions have none "
                             "(predict_views(..., sensitivity=True) needs item_key in the batch)")
        signals["sensitivity"] = np.clip(np.asarray(pred["sensitivity"], dtype=np.float64), 0, 1)
    if weights.get("retrieval", 0.0) > 0:
        signals["retrieval"] = retrieval_hits(
            pred["query_emb"], pred["image_emb"], pred[B.IMAGE_KEY], int(cfg_adapt["retrieval_topk"]),
            int(cfg_adapt["search_chunk"])).astype(np.float64)
    reliability = sum(weights.get(s, 0.0) * sig for s, sig in signals.items()) / sum(weights.values())
    fraction = kept_fraction(cfg_adapt["keep_schedule"], round_index)
    n_keep = int(round(fraction * n))
    order = np.argsort(-reliability, kind="stable")
    keep = np.zeros(n, dtype=bool)
    keep[order[:n_keep]] = True
    keep &= reliability > float(cfg_adapt["min_reliability"])
    return reliability.astype(np.float32), keep


def build_pseudo_labels(pred: Mapping[str, np.ndarray], reliability: np.ndarray, keep: np.ndarray,
                        round_index: int) -> dict[str, np.ndarray]:
    """The kept pairs as pseudo-label rows (numpy columns, M = number kept).

    ``pair_key [M]``; ``box [M, 4]`` the consensus box, cxcywh in the letterboxed square (the
    batch's ``boxes`` format); ``box_weight [M]`` the reliability divided by the largest kept
    reliability, so in (0, 1] (kept pairs have reliability > 0); ``score [M]`` the raw
    reliability; ``round [M]``. With ``orig_size`` in ``pred``, also ``box_xyxy [M, 4]`` in
    the original image's pixels (the dataset's ``box`` format).
    """
    keep = np.asarray(keep, dtype=bool)
    rel = np.asarray(reliability, dtype=np.float32)
    if keep.shape != rel.shape or keep.shape[0] != np.asarray(pred["box"]).shape[0]:
        raise ValueError("reliability, keep and the predictions must have one entry per pair")
    if B.PAIR_KEY not in pred:
        raise KeyError("pseudo-labels need pair_key in the predictions (the batch's pair_key)")
    kept_rel = rel[keep]
    top = float(kept_rel.max()) if kept_rel.size else 1.0
    out = {
        "pair_key": np.asarray(pred[B.PAIR_KEY])[keep].astype(np.int64),
        "box": np.asarray(pred["box"], dtype=np.float32)[keep],
        "box_weight": (kept_rel / top).astype(np.float32) if top > 0 else np.ones_like(kept_rel),
        "score": kept_rel,
        "round": np.full(int(keep.sum()), int(round_index), dtype=np.int32),
    }
    if B.ORIG_SIZE in pred:
        from ..imaging import Letterbox, letterbox_cxcywh_to_xyxy_pixels

        size = np.asarray(pred[B.ORIG_SIZE], dtype=np.float64)[keep]
        # The letterbox side cancels out of the mapping; any positive value gives the same pixels.
        rows = [letterbox_cxcywh_to_xyxy_pixels(b, Letterbox(float(w), float(h), 1))
                for b, (w, h) in zip(out["box"], size)]
        out["box_xyxy"] = (np.stack(rows) if rows else np.zeros((0, 4))).astype(np.float32)
    return out


#: One row per target pair of a labelling round (Parquet between the pipeline's rounds).
PSEUDO_SCHEMA = pa.schema([
    ("pair_id", pa.string()), ("box", pa.list_(pa.float32())), ("box_weight", pa.float32()),
    ("score", pa.float32()), ("kept", pa.bool_()), ("agreement", pa.float32()),
    ("confidence", pa.float32()), ("sensitivity", pa.float32()), ("round", pa.int32()),
])
#: The target rows a round trains on: the contract columns less every annotation.
TARGET_COLUMNS = ("pair_id", "image_id", "image", "width", "height", "query", "domain", "split", "item_id")


def target_rows(table: pa.Table) -> pa.Table:
    """The rows a round trains on from an annotated target table: every annotation column dropped."""
    return table.select([c for c in TARGET_COLUMNS if c in table.column_names])


def pseudo_table(predictions: Mapping[str, np.ndarray], reliability: np.ndarray, keep: np.ndarray,
                 labels: Mapping[str, np.ndarray], round_index: int) -> pa.Table:
    """One row per target pair (N): the kept pairs' boxes and weights as
    :func:`build_pseudo_labels` made them (``labels``: its ``box_xyxy`` in original pixels and
    ``box_weight``; null box and weight 0 where not kept), the raw score, the kept flag and the
    generator's signals (``agreement``, ``confidence``, ``sensitivity``)."""
    keep = np.asarray(keep, dtype=bool)
    n = keep.shape[0]
    if "box_xyxy" not in labels:
        raise KeyError("pseudo_table needs the labels' box_xyxy (predictions with orig_size)")
    boxes: list = [None] * n
    weight = np.zeros(n, np.float32)
    for i, box, w in zip(np.flatnonzero(keep), np.asarray(labels["box_xyxy"]), np.asarray(labels["box_weight"])):
        boxes[i], weight[i] = [float(v) for v in box], float(w)
    p = predictions
    return pa.table({
        "pair_id": pa.array([str(x) for x in p["pair_id"]], pa.string()),
        "box": pa.array(boxes, pa.list_(pa.float32())),
        "box_weight": pa.array(weight),
        "score": pa.array(np.asarray(reliability, np.float32)),
        "kept": pa.array(keep),
        "agreement": pa.array(np.asarray(p["agreement"], np.float32)),
        "confidence": pa.array(np.asarray(p["confidence"], np.float32)),
        "sensitivity": pa.array(np.asarray(p.get("sensitivity", np.full(n, np.nan)), np.float32)),
        "round": pa.array(np.full(n, int(round_index), np.int32)),
    }, schema=PSEUDO_SCHEMA)


def pseudo_lookup(table: pa.Table) -> dict[str, tuple[list[float], float]]:
    """``pair_id -> (box in original pixels, weight)`` of a :func:`pseudo_table`'s kept rows."""
    kept = table.filter(table["kept"])
    return {pid: (box, w) for pid, box, w in zip(kept["pair_id"].to_pylist(), kept["box"].to_pylist(),
                                                 kept["box_weight"].to_pylist())}


def join_pseudo(rows: dict[str, np.ndarray], lookup: Mapping[str, tuple[list[float], float]]) -> dict[str, np.ndarray]:
    """Target contract rows (annotations removed, :data:`TARGET_COLUMNS`) with their pseudo box
    joined by ``pair_id``: ``box`` a float [n, 4] column in original pixels, NaN where a pair has
    none (the data transform reads NaN as no box), and ``box_weight`` [n] (0 where none). The
    transform then decodes, augments and letterboxes box and pixels together.

    A float column rather than an object column of arrays and Nones: Ray Data fell back to
    pickling those, with a warning on the job's terminal for every block."""
    hits = [lookup.get(str(pid)) for pid in rows["pair_id"]]
    boxes = np.full((len(hits), 4), np.nan, np.float32)
    for i, h in enumerate(hits):
        if h is not None:
            boxes[i] = np.asarray(h[0], np.float32)
    rows["box"] = boxes
    rows["box_weight"] = np.asarray([0.0 if h is None else float(h[1]) for h in hits], np.float32)
    return rows
