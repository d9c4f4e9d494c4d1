"""PG-DA self-training, one implementation for the Ray pipeline and the ablation benchmark.

The pieces (no Ray here; the runtime and ``bench/pgda_ablation.py`` differ only in how batches
arrive):

- :class:`EMATeacher` and :func:`ema_decay_for`: the teacher is the student's weights averaged
  over optimiser steps, with a half-life that is a fraction of the run (``adapt.ema_half_life``),
  so a 300-step run and a 30,000-step run average over the same share of their training;
- :func:`adaptation_step`: one optimiser micro-step on a source batch (its supervised loss in
  every step) plus a target batch (retrieval on target pairs, pseudo boxes with their own
  weights, alignment), the aligner's warm-up progress in optimiser steps, then the teacher update;
- :func:`select_round`: scores the whole target set's per-pair predictions, keeps the round's
  most reliable fraction and builds the pseudo-labels (the Ray actor pool and
  :func:`label_target_set` both end here);
- :func:`label_target_set`: the in-process labelling of an iterable of target batches::

    views = build_views(cfg["adapt"]["views"])
    rnd = label_target_set(teacher.model, target_batches, views, round_index, cfg["adapt"])
    rnd.labels          # pseudo-label rows: pair_key, box, box_weight, score, round (+ box_xyxy)
    rnd.summary()       # counts, kept fraction, and pseudo-label precision where hidden boxes exist
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .. import batch as B
from ..boxes import best_match_iou, candidate_boxes, cxcywh_to_xyxy
from ..config import config_section
from .pseudo import (build_pseudo_labels, concat_predictions, kept_fraction, predict_views, retrieval_hits,
                     score_and_select)
from .views import View

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass
class LabelRound:
    """The outcome of one labelling round (numpy arrays over the N target pairs)."""

    round_index: int
    predictions: dict[str, np.ndarray]
    reliability: np.ndarray
    keep: np.ndarray
    labels: dict[str, np.ndarray]
    fraction: float

    def table(self) -> "pa.Table":
        """The round as a :func:`~date_core.adapt.pseudo.pseudo_table` (one row per pair, Parquet-ready)."""
        from .pseudo import pseudo_table

        return pseudo_table(self.predictions, self.reliability, self.keep, self.labels, self.round_index)

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
        iou = self.best_iou()
        if iou is not None:
            has = self._has_box()
            kept = self.keep & has
            out["precision@0.5"] = _mean(iou[kept] >= 0.5)
            out["mIoU"] = _mean(iou[kept])
            out["all_precision@0.5"] = _mean(iou[has] >= 0.5)
            # the patch-level view (box_focus): is the pseudo box centred on a right product?
            centred = self._centre_inside()
            out["centre_precision"] = _mean(centred[kept])
            out["all_centre_precision"] = _mean(centred[has])
        return out

    def signal_precision(self, fraction: float, cfg_adapt: Mapping[str, Any] | None = None) -> dict[str, float]:
        """Which signal finds right boxes: precision@0.5 of the consensus boxes of the top
        ``fraction`` of pairs ranked by each reliability signal alone, by the combined
        reliability, and over all pairs (``all``). Needs the hidden target boxes
        (``keep_annotations=True``); for calibrating ``adapt.reliability`` on a few annotated
        target pairs, never for selection. Ties rank in pair order (a stable sort), so a
        binary signal such as ``retrieval`` ranks its hits first.

        Returns ``{"agreement", "confidence", "sensitivity" (when predicted), "retrieval"
        (with embeddings), "reliability", "all"}`` -> precision in [0, 1], and the same keys
        under ``centre/`` for the share whose box centre lies on a right product (what the
        patch-level pseudo-box term uses); ``{}`` without annotated pairs.
        """
        iou = self.best_iou()
        has = self._has_box()
        if iou is None or not has.any():
            return {}
        p = self.predictions
        right = iou[has] >= 0.5
        signals = {"agreement": p["agreement"], "confidence": p["confidence"]}
        if "sensitivity" in p:
            signals["sensitivity"] = p["sensitivity"]
        if all(k in p for k in ("query_emb", "image_emb", B.IMAGE_KEY)):
            signals["retrieval"] = retrieval_hits(p["query_emb"], p["image_emb"], p[B.IMAGE_KEY],
                                                  int(config_section("adapt", cfg_adapt)["retrieval_topk"])
                                                  ).astype(np.float32)
        signals["reliability"] = self.reliability
        k = max(1, int(round(fraction * right.size)))
        order = {name: np.argsort(-np.asarray(sig, dtype=np.float64)[has], kind="stable")[:k]
                 for name, sig in signals.items()}
        out = {name: float(right[idx].mean()) for name, idx in order.items()}
        out["all"] = float(right.mean())
        # the same ranking judged at the patch level (the centre falls on a right product)
        centred = self._centre_inside()[has]
        out.update({f"centre/{name}": float(centred[idx].mean()) for name, idx in order.items()})
        out["centre/all"] = float(centred.mean())
        return out

    def _has_box(self) -> np.ndarray:
        """Which pairs carry a hidden target box ``[N]`` bool (all, when ``gt_has_box`` is absent)."""
        n = int(self.keep.shape[0])
        return np.asarray(self.predictions.get(f"gt_{B.HAS_BOX}", np.ones(n))) > 0

    def _centre_inside(self) -> np.ndarray:
        """Whether each pair's consensus box centre lies inside one of its hidden answers ``[N]``."""
        p = self.predictions
        cands, valid = candidate_boxes(torch.from_numpy(p[f"gt_{B.BOXES}"]).float(),
                                       None if p.get(f"gt_{B.ALT_BOXES}") is None else torch.from_numpy(p[f"gt_{B.ALT_BOXES}"]).float(),
                                       None if p.get(f"gt_{B.ALT_MASK}") is None else torch.from_numpy(p[f"gt_{B.ALT_MASK}"]).bool())
        xyxy = cxcywh_to_xyxy(cands)                                   # [N, 1+M, 4]
        c = torch.from_numpy(p["box"]).float()[:, None, :2]
        inside = (c[..., 0] >= xyxy[..., 0]) & (c[..., 0] <= xyxy[..., 2]) & (c[..., 1] >= xyxy[..., 1]) & (c[..., 1] <= xyxy[..., 3])
        return (inside & valid).any(dim=1).numpy()

    def best_iou(self) -> np.ndarray | None:
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
            ``consensus`` (median | mean) is read from it unless given, and ``focus_zoom``
            (see :func:`~date_core.adapt.pseudo.predict_views`).
        keep_annotations: carry hidden target boxes through for :meth:`LabelRound.summary`'s
            precision (monitoring only).
    """
    cfg_adapt = config_section("adapt", cfg_adapt)
    consensus = consensus or cfg_adapt["consensus"]
    sens = sensitivity_pass_of(cfg_adapt)
    zoom = focus_zoom_of(cfg_adapt)
    parts = [predict_views(model, b, views, consensus=consensus, keep_annotations=keep_annotations,
                           sensitivity=sens, focus_zoom=zoom) for b in batches]
    if not parts:
        raise ValueError("label_target_set got no target batches")
    return select_round(concat_predictions(parts), round_index, cfg_adapt)


class RowLabeler:
    """Contract rows -> per-pair predictions under the round's views (``pair_id`` carried):
    the labelling work of a Ray Data actor in the pipeline and of a plain loop in the
    benchmark. ``transform``: the unaugmented data transform; hidden target boxes in the rows
    (``box``) are carried for precision monitoring only."""

    def __init__(self, model: torch.nn.Module, transform: Any, views: Sequence[str], consensus: str,
                 sensitivity: bool = True, focus_zoom: float | None = None) -> None:
        from .views import build_views

        self.model, self.transform, self.views = model, transform, build_views(list(views))
        self.consensus, self.sensitivity, self.focus_zoom = consensus, bool(sensitivity), focus_zoom

    @classmethod
    def from_config(cls, model: torch.nn.Module, transform: Any, cfg_adapt: Mapping[str, Any]) -> "RowLabeler":
        """The labeller of the ``adapt`` section (views, consensus, sensitivity pass, focus zoom)."""
        cfg_adapt = config_section("adapt", cfg_adapt)
        return cls(model, transform, list(cfg_adapt["views"]), cfg_adapt["consensus"],
                   sensitivity_pass_of(cfg_adapt), focus_zoom_of(cfg_adapt))

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = self.transform(rows)
        out = predict_views(self.model, batch, self.views, consensus=self.consensus,
                            keep_annotations="box" in rows, sensitivity=self.sensitivity, focus_zoom=self.focus_zoom)
        out["pair_id"] = np.asarray(rows["pair_id"], dtype=object)
        return out


def sensitivity_pass_of(cfg_adapt: Mapping[str, Any]) -> bool:
    """Whether labelling runs the query-sensitivity pass: ``adapt.sensitivity_pass``, or any
    ``adapt.reliability`` weight on ``sensitivity`` (a weighted signal must be computed)."""
    cfg_adapt = config_section("adapt", cfg_adapt)
    weighted = float(cfg_adapt["reliability"].get("sensitivity") or 0.0) > 0  # a signal absent = weight 0
    return bool(cfg_adapt["sensitivity_pass"]) or weighted


def focus_zoom_of(cfg_adapt: Mapping[str, Any]) -> float | None:
    """``adapt.focus_zoom`` checked: ``None`` (off) or a zoom factor in [1, 4] (1 only moves each
    pair's first box centre to the middle of the view, without zooming)."""
    zoom = config_section("adapt", cfg_adapt)["focus_zoom"]
    if zoom is None:
        return None
    zoom = float(zoom)
    if not 1.0 <= zoom <= 4.0:
        raise ValueError(f"adapt.focus_zoom must be null or lie in [1, 4], got {zoom}")
    return zoom


def select_round(pred: dict[str, np.ndarray], round_index: int, cfg_adapt: Mapping[str, Any]) -> LabelRound:
    """The global half of labelling: reliability of every pair of the whole target set, the
    round's kept fraction, and the pseudo-label rows (``pred``: :func:`concat_predictions` of
    :func:`predict_views` over the target set)."""
    cfg_adapt = config_section("adapt", cfg_adapt)
    reliability, keep = score_and_select(pred, round_index, cfg_adapt)
    labels = build_pseudo_labels(pred, reliability, keep, round_index)
    fraction = kept_fraction(cfg_adapt["keep_schedule"], round_index)
    return LabelRound(round_index, pred, reliability, keep, labels, fraction)


# ----------------------------------------------------------------------------- per round
def round_loss_weights(weights: Mapping[str, Any], cfg_adapt: Mapping[str, Any], round_index: int) -> dict[str, Any]:
    """The loss weights of self-training round ``round_index`` (0-based): ``weights`` with the
    alignment terms (``align_*``, ``adversarial``) at zero outside the rounds
    ``[adapt.align_from_round, adapt.align_until_round)``.

    Why: the round that trains before the first labelling makes the teacher that labels the
    target, and the rounds after it train on those labels; the two ask different things of
    alignment. With ``align_from_round: 1`` the first labels are those of pseudo-labels alone.
    With ``align_until_round: 1`` only the labelling teacher is aligned and the later rounds
    train on its labels without alignment (docs/experiments.md compares the three). The
    defaults (0 and null) align in every round."""
    from date_core.training.losses import ALIGNMENT_TERMS

    cfg_adapt = config_section("adapt", cfg_adapt)
    start = int(cfg_adapt["align_from_round"])
    if start < 0:
        raise ValueError(f"adapt.align_from_round must be >= 0, got {start}")
    until = cfg_adapt["align_until_round"]
    if until is not None and int(until) <= start:
        raise ValueError(f"adapt.align_until_round ({until}) must be null or above align_from_round ({start})")
    out = dict(weights)
    if round_index < start or (until is not None and round_index >= int(until)):
        out.update({t: 0.0 for t in ALIGNMENT_TERMS if t in out})
    return out


# ----------------------------------------------------------------------------- the teacher
def ema_decay_for(total_steps: int, cfg_adapt: Mapping[str, Any]) -> float:
    """The EMA teacher's decay for a run of ``total_steps`` optimiser steps.

    ``adapt.ema_decay`` (a number) wins; otherwise the half-life is ``adapt.ema_half_life``
    of the run: ``decay = 0.5 ** (1 / (half_life * total_steps))``, clipped to
    [0.9, 0.9999]. A fixed 0.999 (Mean Teacher's) would average over ~700 steps: longer than a
    whole CPU round, so the teacher would still carry its initial weights at the end."""
    cfg_adapt = config_section("adapt", cfg_adapt)
    fixed = cfg_adapt["ema_decay"]
    if fixed is not None:
        decay = float(fixed)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"adapt.ema_decay must lie in [0, 1), got {decay}")
        return decay
    half_life = float(cfg_adapt["ema_half_life"]) * max(1, int(total_steps))
    return float(min(0.9999, max(0.9, 0.5 ** (1.0 / max(half_life, 1.0)))))


class EMATeacher:
    """The pseudo box generator's teacher: an exponential moving average of the student.

    ``teacher = decay * teacher + (1 - decay) * student`` after every optimiser step
    (parameters; buffers are copied). The teacher never trains and stays in eval mode.
    ``model`` is a :class:`~date_core.model.DateModel`; DDP wrappers of the student are looked
    through, so every data-parallel rank holds the same teacher.
    """

    def __init__(self, student: nn.Module, decay: float) -> None:
        from ..model import unwrap

        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = float(decay)
        self.model = copy.deepcopy(unwrap(student)).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        from ..model import unwrap

        student = unwrap(student)
        for t, s in zip(self.model.parameters(), student.parameters()):
            if s.requires_grad:  # frozen layers are equal already
                t.lerp_(s.detach().to(t.dtype), 1.0 - self.decay)
        for t, s in zip(self.model.buffers(), student.buffers()):
            t.copy_(s)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "decay": self.decay, "updates": self.updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.decay, self.updates = float(state["decay"]), int(state["updates"])


# ----------------------------------------------------------------------------- one step
def adaptation_step(student: nn.Module, criterion, source_batch: Mapping[str, Any], optimizer, scheduler=None, *,
                    target_batch: Mapping[str, Any] | None = None, aligner: nn.Module | None = None,
                    teacher: EMATeacher | None = None, progress: float | None = None,
                    **train_kwargs: Any) -> dict[str, float]:
    """One micro-step of PG-DA training, as both the Ray workers and the benchmark run it.

    The source batch's supervised loss is in every step; ``target_batch`` adds retrieval on
    target pairs and the pseudo-box terms of the pairs that carry one (``has_box``,
    ``box_weight``); ``aligner`` adds the alignment terms, its GRL warm-up pinned to
    ``progress`` = optimiser steps done / total (so it follows the run's length whatever the
    gradient accumulation); after an optimiser step the ``teacher`` follows the student.
    ``train_kwargs`` go to :func:`date_core.training.engine.train_step` (``grad_accum``, ``micro_step``,
    ``device``, ``autocast_dtype``, ``max_grad_norm``), except ``zoom_out`` ({"range": [lo, hi],
    "prob": p} or None, from :func:`zoom_settings`): the scale augmentation of
    :func:`~date_core.adapt.views.random_zoom_out` on both batches, and ``strong_aug`` (bool,
    ``adapt.strong_aug``): :func:`~date_core.adapt.strong.strong_augment` on the target batch's
    pixels, the student's strong view of what the teacher labelled. Returns the step's logs
    (+ ``grl_coeff``).
    """
    from date_core.training.engine import train_step
    from .views import random_zoom_out

    zoom = train_kwargs.pop("zoom_out", None)
    strong = bool(train_kwargs.pop("strong_aug", False))
    if zoom:  # scale augmentation of every batch that carries boxes (see random_zoom_out)
        source_batch = random_zoom_out(_tensors(source_batch), zoom["range"], zoom["prob"])
        if target_batch is not None:
            target_batch = random_zoom_out(_tensors(target_batch), zoom["range"], zoom["prob"])
    if strong and target_batch is not None:
        from .strong import strong_augment

        target_batch = _tensors(target_batch)
        target_batch[B.PIXEL_VALUES] = strong_augment(torch.as_tensor(target_batch[B.PIXEL_VALUES]).float())
    logs_extra: dict[str, float] = {}
    if aligner is not None and progress is not None:
        inner = getattr(aligner, "module", aligner)
        if hasattr(inner, "set_progress"):
            inner.set_progress(progress)
            if hasattr(inner, "grl_coeff"):
                logs_extra["grl_coeff"] = float(inner.grl_coeff)
    logs = train_step(student, criterion, source_batch, optimizer, scheduler, target_batch=target_batch,
                      aligner=aligner, **train_kwargs)
    if teacher is not None and logs["stepped"]:
        teacher.update(student)
    logs.update(logs_extra)
    return logs


def zoom_settings(cfg_train: Mapping[str, Any]) -> dict[str, Any] | None:
    """``train.zoom_out`` ([lo, hi] or null) and ``train.zoom_prob`` -> :func:`adaptation_step`'s
    ``zoom_out`` argument (None when off)."""
    cfg_train = config_section("train", cfg_train)
    rng = cfg_train["zoom_out"]
    prob = float(cfg_train["zoom_prob"])
    if not rng or prob <= 0:
        return None
    return {"range": [float(rng[0]), float(rng[1])], "prob": prob}


def _tensors(batch: Mapping[str, Any]) -> dict[str, Any]:
    """numpy columns (Ray Data) -> tensors, others kept."""
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
