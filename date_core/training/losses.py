"""Losses as a dict of named terms combined by a weight dict (DETR's pattern), so every weight
is one config value (``loss:`` in ``configs/default.yaml``) that Tune can sweep.

Terms: ``retrieval`` (symmetric InfoNCE over the global batch), ``box_l1`` and ``box_giou``
(against the best-matching answer among ``box`` and ``alt_boxes``), ``confidence`` (the
confidence head regresses the predicted box's IoU), ``box_focus`` (cross-entropy between the
grounding seeker's patch attention and the patches inside that answer: a dense, well-conditioned
signal that the soft-argmax box centre alone gives only weakly; on ProductWorld mall it lifted
tiny's val Acc@0.5 after 300 steps from 0.27 to 0.41), and the adaptation slots filled by the
aligner: ``align_marginal_image``, ``align_marginal_query``, ``align_conditional``,
``adversarial``.

Pseudo boxes (PG-DA self-training) train through their own terms, ``pseudo_box_l1``,
``pseudo_box_giou`` and ``pseudo_box_focus``, so their weights sit below the source boxes' and
can be swept apart; a target batch never trains the confidence head (it must not grade its own
labels: its targets would be the IoU with a box the model itself produced).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from date_core import batch as B
from date_core.boxes import candidate_boxes, box_iou, cxcywh_to_xyxy, generalized_box_iou

SUPERVISED_TERMS = ("retrieval", "box_l1", "box_giou", "confidence", "box_focus")
PSEUDO_TERMS = ("pseudo_box_l1", "pseudo_box_giou", "pseudo_box_focus")
ALIGNMENT_TERMS = ("align_marginal_image", "align_marginal_query", "align_conditional", "adversarial")
LOSS_NAMES = SUPERVISED_TERMS + PSEUDO_TERMS + ALIGNMENT_TERMS


def active_alignment_terms(weights: Mapping[str, Any]) -> list[str]:
    """The alignment terms of ``weights`` (loss name -> weight) that actually run (non-zero)."""
    return [t for t in ALIGNMENT_TERMS if float(weights.get(t, 0.0) or 0.0) != 0.0]

#: what ``pseudo_box_focus`` puts the seeker's attention on: the pseudo box's patches, or only the
#: patch at its centre (a teacher's box is more often centred on the product than right in extent)
FOCUS_TARGETS = ("box", "centre")
DEFAULT_WEIGHTS = {"retrieval": 1.0, "box_l1": 5.0, "box_giou": 2.0, "confidence": 1.0, "box_focus": 1.0,
                   "pseudo_box_l1": 2.5, "pseudo_box_giou": 1.0, "pseudo_box_focus": 0.5,
                   "align_marginal_image": 0.0, "align_marginal_query": 0.0,
                   "align_conditional": 0.0, "adversarial": 0.0}


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_local_grad(x: Tensor) -> Tensor:
    """All-gather ``x [b_r, ...]`` from every data-parallel rank -> ``[sum b_r, ...]`` in rank order.

    As open_clip's ``gather_features`` (``local_loss=False, gather_with_grad=False``): the other
    ranks' rows are constants and this rank's rows are the original tensor, so the gradient flows
    through the local shard only; summed over ranks (what DDP does, up to its 1/world average)
    it is the full-batch gradient. Ranks may hold different batch sizes. Without a process group
    (or with one rank) ``x`` comes back unchanged.
    """
    rank, world = _world()
    if world == 1:
        return x
    size = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    padded = x.detach()
    if x.shape[0] < max(counts):
        pad = x.new_zeros((max(counts) - x.shape[0], *x.shape[1:]))
        padded = torch.cat([padded, pad])
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded.contiguous())
    parts = [g[:c] for g, c in zip(gathered, counts)]
    parts[rank] = x
    return torch.cat(parts)


def info_nce(image_emb: Tensor, query_emb: Tensor, logit_scale: Tensor,
             item_key: Tensor | None = None, gather: bool = True) -> Tensor:
    """Symmetric InfoNCE over the global batch.

    ``image_emb, query_emb [B, D]`` (L2-normalised, row i is a pair), ``logit_scale`` scalar.
    With ``item_key [B]`` every pair of the same product is a positive (soft targets spread
    over them), so two queries of one image, or two photos of one product, are not pushed
    apart as false negatives. With ``gather`` the features of all data-parallel ranks are
    gathered first (see :func:`gather_with_local_grad`).
    """
    if gather:
        image_emb = gather_with_local_grad(image_emb)
        query_emb = gather_with_local_grad(query_emb)
        if item_key is not None:
            item_key = gather_with_local_grad(item_key)
    logits = logit_scale * image_emb.float() @ query_emb.float().t()  # [B, B] image -> query
    if item_key is None:
        targets = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
    positives = (item_key[:, None] == item_key[None, :]).float()
    soft = positives / positives.sum(dim=1, keepdim=True)
    # positives is symmetric, so the same soft targets serve both directions
    return (F.cross_entropy(logits, soft) + F.cross_entropy(logits.t(), soft)) / 2


class DateCriterion(nn.Module):
    """Computes the supervised terms and combines any named terms with ``weights``.

    ``criterion(outputs, batch)`` -> dict of unweighted scalar terms (``retrieval``, ``box_l1``,
    ``box_giou``, ``confidence``); ``criterion.total(terms)`` -> the weighted sum.
    Box terms count only rows with ``has_box`` and are weighted per row by ``box_weight``
    (1 for annotations, the reliability for pseudo boxes), normalised by the number of boxes.
    """

    def __init__(self, weights: Mapping[str, float] | None = None, gather: bool = True,
                 pseudo_focus: str = "centre") -> None:
        super().__init__()
        if pseudo_focus not in FOCUS_TARGETS:
            raise ValueError(f"unknown pseudo focus target {pseudo_focus!r}; choose one of {FOCUS_TARGETS}")
        self.pseudo_focus = pseudo_focus
        merged = dict(DEFAULT_WEIGHTS)
        for name, value in (weights or {}).items():
            if name not in LOSS_NAMES:
                raise KeyError(f"unknown loss term {name!r}; known terms: {LOSS_NAMES}")
            merged[name] = float(value)
        self.weights = merged
        self.gather = gather

    def forward(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor],
                pseudo: bool = False) -> dict[str, Tensor]:
        """Unweighted terms. ``pseudo=True`` (a target batch whose boxes are pseudo boxes):
        the box terms come back as ``pseudo_box_*`` and there is no ``confidence`` term."""
        terms = {"retrieval": self.retrieval_term(outputs, batch)}
        boxes = self.box_terms(outputs, batch, focus_weight_name="pseudo_box_focus" if pseudo else "box_focus",
                               centre_only=pseudo and self.pseudo_focus == "centre")
        if pseudo:
            boxes.pop("confidence")
            boxes = {f"pseudo_{k}": v for k, v in boxes.items()}
        terms.update(boxes)
        return terms

    def retrieval_term(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        """Symmetric InfoNCE of ``image_emb`` against ``query_emb``, same-item pairs positive."""
        return info_nce(outputs["image_emb"], outputs["query_emb"], outputs["logit_scale"],
                        batch.get(B.ITEM_KEY), gather=self.gather)

    def box_terms(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor],
                  focus_weight_name: str = "box_focus", centre_only: bool = False) -> dict[str, Tensor]:
        pred = outputs["pred_boxes"].float()
        n = pred.shape[0]
        has_box = batch.get(B.HAS_BOX)
        if B.BOXES not in batch:  # e.g. target pairs before any pseudo box exists
            has_box = torch.zeros(n, device=pred.device)
        has_box = torch.ones(n, device=pred.device) if has_box is None else has_box.float().to(pred.device)
        weight = batch.get(B.BOX_WEIGHT)
        weight = has_box if weight is None else weight.float().to(pred.device) * has_box
        zero = pred.sum() * 0.0  # keeps the graph (and DDP's unused-parameter check) intact
        focus_on = "patch_logits" in outputs and bool(self.weights.get(focus_weight_name, 0.0))
        if not bool((has_box > 0).any()):
            out = {"box_l1": zero, "box_giou": zero, "confidence": zero + outputs["pred_conf_logit"].sum() * 0.0}
            if focus_on:
                out["box_focus"] = zero + outputs["patch_logits"].sum() * 0.0
            return out
        cands, valid = candidate_boxes(batch[B.BOXES].float().to(pred.device),
                                       _opt(batch, B.ALT_BOXES, pred.device), _opt(batch, B.ALT_MASK, pred.device))
        l1 = (pred[:, None, :] - cands).abs().sum(-1)  # [B, 1+M]
        giou = generalized_box_iou(cxcywh_to_xyxy(pred)[:, None, :], cxcywh_to_xyxy(cands))
        # any answer among box + alt_boxes is right: regress towards the one already closest
        cost = self.weights["box_l1"] * l1 + self.weights["box_giou"] * (1 - giou)
        best = cost.detach().masked_fill(~valid, float("inf")).argmin(dim=1)
        rows = torch.arange(n, device=pred.device)
        norm = has_box.sum().clamp(min=1.0)
        l1_best, giou_best = l1[rows, best], giou[rows, best]
        target = cands[rows, best]
        iou = box_iou(cxcywh_to_xyxy(pred.detach()), cxcywh_to_xyxy(target))
        conf = F.binary_cross_entropy_with_logits(outputs["pred_conf_logit"].float(), iou, reduction="none")
        out = {"box_l1": (weight * l1_best).sum() / norm,
               "box_giou": (weight * (1 - giou_best)).sum() / norm,
               "confidence": (weight * conf).sum() / norm}
        if focus_on:
            focus = F.cross_entropy(outputs["patch_logits"].float(),
                                    focus_targets(target, outputs["patch_logits"].shape[1], centre_only), reduction="none")
            out["box_focus"] = (weight * focus).sum() / norm
        return out

    def total(self, terms: Mapping[str, Tensor]) -> Tensor:
        """Weighted sum of named terms; an unknown name is an error (a typo must not train silently)."""
        unknown = [k for k in terms if k not in self.weights]
        if unknown:
            raise KeyError(f"unknown loss term(s) {unknown}; known terms: {LOSS_NAMES}")
        if not terms:
            raise ValueError("no loss terms to combine")
        total = next(iter(terms.values())).new_zeros(())
        for name, value in terms.items():
            if self.weights[name] != 0.0:
                total = total + self.weights[name] * value
        return total


class ContrastiveCriterion(DateCriterion):
    """The retrieval term alone, for models without a grounding head (the plain dual encoder,
    :mod:`date_core.model.dual`); ``engine.train_step`` trains with it unchanged."""

    def forward(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor],
                pseudo: bool = False) -> dict[str, Tensor]:
        if pseudo:
            raise ValueError("a contrastive-only model has no boxes to self-train")
        return {"retrieval": self.retrieval_term(outputs, batch)}


def focus_targets(boxes_cxcywh: Tensor, n_patches: int, centre_only: bool = False) -> Tensor:
    """Where the grounding seeker should look: ``[B, N]`` probabilities spread evenly over the
    patches whose centres lie inside the target box (the patch holding the box centre when the
    box is smaller than a patch); ``centre_only``: all of it on the patch holding the centre."""
    grid = int(round(n_patches ** 0.5))
    idx = (torch.arange(grid, device=boxes_cxcywh.device, dtype=torch.float32) + 0.5) / grid
    cy, cx = torch.meshgrid(idx, idx, indexing="ij")
    cx, cy = cx.flatten()[None], cy.flatten()[None]
    x1, y1, x2, y2 = cxcywh_to_xyxy(boxes_cxcywh.float()).unbind(-1)
    inside = (cx >= x1[:, None]) & (cx <= x2[:, None]) & (cy >= y1[:, None]) & (cy <= y2[:, None])
    if centre_only:
        inside = torch.zeros_like(inside)
    col = (boxes_cxcywh[:, 0] * grid).long().clamp(0, grid - 1)
    row = (boxes_cxcywh[:, 1] * grid).long().clamp(0, grid - 1)
    inside[torch.arange(inside.shape[0], device=inside.device), row * grid + col] = True
    inside = inside.float()
    return inside / inside.sum(dim=1, keepdim=True)


def _opt(batch: Mapping[str, Tensor], key: str, device: torch.device) -> Tensor | None:
    value = batch.get(key)
    return None if value is None else value.float().to(device)


def build_criterion(loss_cfg: Mapping[str, float] | None = None, gather: bool = True,
                    pseudo_focus: str = "centre") -> DateCriterion:
    """The criterion from a config's ``loss:`` section (missing names keep their defaults) and
    ``adapt.pseudo_focus`` (``box`` | ``centre``: what the pseudo boxes' focus term targets)."""
    return DateCriterion(loss_cfg, gather=gather, pseudo_focus=pseudo_focus)
