"""One labelling round of PG-DA self-training, in process (no Ray).

The distributed pipeline maps :func:`~date_core.adapt.pseudo.predict_views` over the target
set with a Ray Data actor pool and then calls the same global step; this module is that recipe
for an iterable of batches (tests, benchmarks, a single machine)::

    views = build_views(cfg["adapt"]["views"])
    rnd = label_target_set(model, target_batches, views, round_index, cfg["adapt"])
    rnd.labels          # pseudo-label rows: pair_key, box, box_weight, score, round (+ box_xyxy)
    rnd.summary()       # counts, kept fraction, and pseudo-label precision where hidden boxes exist
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from .. import batch as B
from ..boxes import best_match_iou
from .pseudo import (build_pseudo_labels, concat_predictions, kept_fraction, predict_views, retrieval_hits,
                     score_and_select)
from .views import View


@dataclass
class LabelRound:
    """The outcome of one labelling round (numpy arrays over the N target pairs)."""

    round_index: int
    predictions: dict[str, np.ndarray]
    reliability: np.ndarray
    keep: np.ndarray
    labels: dict[str, np.ndarray]
    fraction: float

    def summary(self) -> dict[str, float]:
        """Counts and means; with hidden target boxes in ``predictions`` (``gt_*``), also the
        pseudo-label precision: ``precision@0.5`` / ``mIoU`` of the kept pseudo boxes, and
        ``all_precision@0.5`` of the consensus box over all pairs (what selection improves on)."""
        n = int(self.keep.shape[0])
        out = {
            "round": float(self.round_index), "n_pairs": float(n), "n_kept": float(self.keep.sum()),
            "kept_fraction": float(self.keep.mean()) if n else float("nan"), "target_fraction": self.fraction,
            "reliability_mean": float(self.reliability.mean()) if n else float("nan"),
            "reliability_kept_mean": float(self.reliability[self.keep].mean()) if self.keep.any() else float("nan"),
            "agreement_mean": float(self.predictions["agreement"].mean()) if n else float("nan"),
        }
        iou = self._best_iou()
        if iou is not None:
            has = self._has_box()
            kept = self.keep & has
            out["precision@0.5"] = _mean(iou[kept] >= 0.5)
            out["mIoU"] = _mean(iou[kept])
            out["all_precision@0.5"] = _mean(iou[has] >= 0.5)
        return out

    def signal_precision(self, fraction: float, cfg_adapt: Mapping[str, Any] | None = None) -> dict[str, float]:
        """Which signal finds right boxes: precision@0.5 of the consensus boxes of the top
        ``fraction`` of pairs ranked by each reliability signal alone, by the combined
        reliability, and over all pairs (``all``). Needs the hidden target boxes
        (``keep_annotations=True``); for calibrating ``adapt.reliability`` on a few annotated
        target pairs, never for selection. Ties rank in pair order (a stable sort), so a
        binary signal such as ``retrieval`` ranks its hits first.

        Returns ``{"agreement", "confidence", "retrieval" (with embeddings), "reliability",
        "all"}`` -> precision in [0, 1]; ``{}`` without annotated pairs.
        """
        iou = self._best_iou()
        has = self._has_box()
        if iou is None or not has.any():
            return {}
        p = self.predictions
        right = iou[has] >= 0.5
        signals = {"agreement": p["agreement"], "confidence": p["confidence"]}
        if all(k in p for k in ("query_emb", "image_emb", B.IMAGE_KEY)):
            signals["retrieval"] = retrieval_hits(p["query_emb"], p["image_emb"], p[B.IMAGE_KEY],
                                                  int((cfg_adapt or {}).get("retrieval_topk", 5))).astype(np.float32)
        signals["reliability"] = self.reliability
        k = max(1, int(round(fraction * right.size)))
        out = {name: float(right[np.argsort(-np.asarray(sig, dtype=np.float64)[has], kind="stable")[:k]].mean())
               for name, sig in signals.items()}
        out["all"] = float(right.mean())
        return out

    def _has_box(self) -> np.ndarray:
        """Which pairs carry a hidden target box ``[N]`` bool (all, when ``gt_has_box`` is absent)."""
        n = int(self.keep.shape[0])
        return np.asarray(self.predictions.get(f"gt_{B.HAS_BOX}", np.ones(n))) > 0

    def _best_iou(self) -> np.ndarray | None:
        """IoU of each pair's consensus box with its best hidden answer (``box`` or an
        ``alt_boxes`` entry) ``[N]``; ``None`` without hidden annotations."""
        p = self.predictions
        if f"gt_{B.BOXES}" not in p:
            return None
        alt, mask = p.get(f"gt_{B.ALT_BOXES}"), p.get(f"gt_{B.ALT_MASK}")
        iou, _ = best_match_iou(torch.from_numpy(p["box"]).float(), torch.from_numpy(p[f"gt_{B.BOXES}"]).float(),
                                None if alt is None else torch.from_numpy(alt).float(),
                                None if mask is None else torch.from_numpy(mask).bool())
        return iou.numpy()


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values)) if values.size else float("nan")


def label_target_set(model: torch.nn.Module, batches: Iterable[Mapping[str, Any]], views: Sequence[View],
                     round_index: int, cfg_adapt: Mapping[str, Any], *, consensus: str | None = None,
                     keep_annotations: bool = False) -> LabelRound:
    """Predict every target batch under ``views``, score all pairs together, keep the round's
    most reliable fraction and turn it into pseudo-label rows.

    Args:
        model: the DATE model (any device; batches are moved to it).
        batches: the target set's batches (:mod:`date_core.batch` keys; ``pair_key`` and
            ``image_key`` needed).
        views: from :func:`~date_core.adapt.views.build_views`.
        round_index: 0-based labelling round (selects the kept fraction of ``keep_schedule``).
        cfg_adapt: the ``adapt`` config section (see :func:`~date_core.adapt.pseudo.score_and_select`);
            ``consensus`` (median | mean) is read from it unless given.
        keep_annotations: carry hidden target boxes through for :meth:`LabelRound.summary`'s
            precision (monitoring only).
    """
    consensus = consensus or cfg_adapt.get("consensus", "median")
    parts = [predict_views(model, b, views, consensus=consensus, keep_annotations=keep_annotations)
             for b in batches]
    if not parts:
        raise ValueError("label_target_set got no target batches")
    pred = concat_predictions(parts)
    reliability, keep = score_and_select(pred, round_index, cfg_adapt)
    labels = build_pseudo_labels(pred, reliability, keep, round_index)
    fraction = kept_fraction(cfg_adapt.get("keep_schedule", [1.0]), round_index)
    return LabelRound(round_index, pred, reliability, keep, labels, fraction)
