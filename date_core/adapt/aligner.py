"""The domain aligner of PG-DA: named alignment losses between a source and a target batch.

Both aligners take the model's forward dicts of a source batch and a target batch
(``image_tokens``/``query_tokens`` ``[B, K, d]``, ``fused`` ``[B, d_f]``, ``pred_boxes``
``[B, 4]``, ``pred_conf`` ``[B]``) and return a dict of scalar losses whose keys are weight
names of the criterion (``loss:`` in the config):

* ``mmd`` -> ``align_marginal_image``, ``align_marginal_query`` (MK-MMD of each modality's
  concentrated features) and ``align_conditional`` (MMD of the fused image-query features that
  feed the box head, by default jointly with the predicted box: JMMD).
* ``adversarial`` -> ``adversarial``: domain discriminators behind a gradient-reversal layer on
  the same three feature sets (the conditional one on the CDAN multilinear map
  ``fused (x) [box, 1]``), their BCE losses averaged with ``discriminator.parts`` weights.

Design choices (config keys under ``adapt``):

* ``token_pooling: flatten`` (default) treats an image's K concentrated tokens as one sample
  ``[K*d]``. A Gaussian kernel on the concatenation is the product of per-slot Gaussian
  kernels, so MMD compares the *joint* distribution of the K semantic slots, which is what
  the seekers read. ``mean`` (one ``[d]`` vector per image) is blind to shifts that cancel in
  the mean (two slots swapping content); ``tokens`` (``B*K`` samples of ``[d]``) has more
  samples but only matches the mixture over slots, not which slot carries what.
* ``conditional: joint`` (default) aligns ``P(fused, box)``: the kernel on a pair of samples
  is ``k_f(fused) * k_b(box)``. Target pairs are thereby aligned with source pairs whose box
  predictions look alike, instead of the marginal of ``fused`` only, which can be matched
  while the feature -> box relation stays misaligned (the JAN / CDAN argument). For box
  regression the multilinear map of CDAN depends on the box's magnitude; the kernel product
  does not. ``conditional_detach_boxes: true`` (default, as CDAN's reference code) conditions
  on the prediction without pushing target boxes towards the source box statistics.
  ``conditional: fused`` is the plain MMD of ``fused``.
* ``size_reweight: true`` (the config's default) weights the source pairs of the image and
  conditional terms by :func:`~date_core.adapt.mmd.size_shift_weights`, the density ratio of
  the (predicted) box's log area, so that they are compared with source pairs of the target's
  box sizes: a weighted MMD, or a weighted BCE of the discriminators. Without it, matching
  ``fused`` (which also sets the size) pulls small target products' boxes to source sizes
  (docs/experiments.md has the measurements).
* ``protect_box: true`` projects the conditional term's gradient at ``fused``, per pair, off
  the directions that move the box head's outputs (its size logits and centre refinements:
  :meth:`~date_core.model.seekers.GroundingSeeker.box_jacobian`). The term can then still
  reshape ``fused`` and what lies upstream, but its direct push on the box is removed, where
  ``size_reweight`` can only choose which source pairs to compare with. It needs the model,
  so it is built by :func:`build_aligner_for_model`.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from ..config import config_section
from .grl import grad_reverse, grl_coefficient
from .mmd import DEFAULT_MULTIPLIERS, ESTIMATORS, joint_mk_mmd, mk_mmd, size_shift_weights

MARGINAL_IMAGE = "align_marginal_image"
MARGINAL_QUERY = "align_marginal_query"
CONDITIONAL = "align_conditional"
ADVERSARIAL = "adversarial"
ALIGNER_KINDS = ("mmd", "adversarial")
TOKEN_POOLINGS = ("flatten", "mean", "tokens")
CONDITIONAL_KINDS = ("joint", "fused")
_REQUIRED = ("image_tokens", "query_tokens", "fused", "pred_boxes")


def pool_tokens(tokens: torch.Tensor, pooling: str) -> torch.Tensor:
    """``[B, K, d]`` concentrated features -> samples for alignment.

    ``flatten`` -> ``[B, K*d]``, ``mean`` -> ``[B, d]``, ``tokens`` -> ``[B*K, d]``.
    """
    if tokens.ndim != 3:
        raise ValueError(f"expected tokens [B, K, d], got shape {tuple(tokens.shape)}")
    if pooling == "flatten":
        return tokens.flatten(1)
    if pooling == "mean":
        return tokens.mean(dim=1)
    if pooling == "tokens":
        return tokens.flatten(0, 1)
    raise ValueError(f"unknown token_pooling {pooling!r}; choose one of {TOKEN_POOLINGS}")


class _ProjectOff(torch.autograd.Function):
    """Identity forward; backward removes the gradient's component in the span of ``basis``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(basis)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (q,) = ctx.saved_tensors
        g = grad.float()
        g = g - torch.einsum("bm,bmd->bd", torch.einsum("bmd,bd->bm", q, g), q)
        return g.to(grad.dtype), None


def project_off(x: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Identity on ``x [B, d]`` whose gradient, row by row, loses its component in the span of
    that row's ``directions [B, m, d]`` (any m <= d vectors, orthonormalised here)."""
    if directions.shape[0] != x.shape[0] or directions.shape[-1] != x.shape[-1]:
        raise ValueError(f"directions {tuple(directions.shape)} do not match x {tuple(x.shape)} as [B, m, d]")
    q, _ = torch.linalg.qr(directions.detach().float().transpose(1, 2))  # [B, d, m], orthonormal columns
    return _ProjectOff.apply(x, q.transpose(1, 2).contiguous())


def pooled_dim(num_tokens: int, token_dim: int, pooling: str) -> int:
    """Feature size of :func:`pool_tokens`'s output."""
    if pooling not in TOKEN_POOLINGS:
        raise ValueError(f"unknown token_pooling {pooling!r}; choose one of {TOKEN_POOLINGS}")
    return num_tokens * token_dim if pooling == "flatten" else token_dim


class DomainAligner(nn.Module):
    """Base class: ``aligner(src_out, tgt_out) -> dict[str, Tensor]`` of named scalar losses."""

    #: The loss names this aligner returns.
    loss_names: tuple[str, ...] = ()

    def __init__(self, token_pooling: str = "flatten", size_reweight: bool = False,
                 box_jacobian: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__()
        if token_pooling not in TOKEN_POOLINGS:
            raise ValueError(f"unknown token_pooling {token_pooling!r}; choose one of {TOKEN_POOLINGS}")
        self.token_pooling = token_pooling
        self.size_reweight = bool(size_reweight)
        # a plain callable (the model's GroundingSeeker.box_jacobian), not a submodule: the
        # aligner must not own, save or optimise the model's box head
        self.box_jacobian = box_jacobian
        #: Detached diagnostics of the last call (floats), for logging.
        self.last_stats: dict[str, float] = {}

    @staticmethod
    def _check(src_out: Mapping[str, torch.Tensor], tgt_out: Mapping[str, torch.Tensor]) -> None:
        for name, out in (("source", src_out), ("target", tgt_out)):
            missing = [k for k in _REQUIRED if k not in out]
            if missing:
                raise KeyError(f"{name} model output lacks {missing}; the aligner needs {list(_REQUIRED)}")
        for key in ("image_tokens", "query_tokens", "fused"):
            if src_out[key].shape[1:] != tgt_out[key].shape[1:]:
                raise ValueError(f"{key}: source {tuple(src_out[key].shape)} and target "
                                 f"{tuple(tgt_out[key].shape)} differ beyond the batch dimension")

    def _size_weights(self, src_out: Mapping[str, torch.Tensor], tgt_out: Mapping[str, torch.Tensor]
                      ) -> torch.Tensor | None:
        """``[B_s]`` source weights (mean 1, detached) under ``size_reweight``, else None."""
        bs, bt = src_out["pred_boxes"], tgt_out["pred_boxes"]
        if not self.size_reweight or bs.shape[0] < 2 or bt.shape[0] < 2:
            return None
        return size_shift_weights(bs, bt)

    def _conditional_fused(self, out: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``fused [B, d]`` as the conditional term sees it: under ``protect_box`` its gradient
        is projected off the box head's input directions (:func:`project_off`)."""
        fused = out["fused"]
        if self.box_jacobian is None or not torch.is_grad_enabled() or not fused.requires_grad:
            return fused
        return project_off(fused, self.box_jacobian(fused))

    @staticmethod
    def _ess(w: torch.Tensor) -> float:
        """Effective sample size of weights ``w`` (their count when all are equal): logged as
        ``size_weight_ess``, it says how many source pairs the reweighted batch really has."""
        return float(w.sum() ** 2 / (w * w).sum())

    def forward(self, src_out: Mapping[str, torch.Tensor], tgt_out: Mapping[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def _zero_like_graph(*tensors: torch.Tensor) -> torch.Tensor:
    # A batch too small to estimate a discrepancy contributes 0, still attached to the graph
    # so that backward() and DDP's unused-parameter bookkeeping behave as on other steps.
    return sum(t.sum() * 0.0 for t in tensors)


class MMDAligner(DomainAligner):
    """Multi-kernel MMD aligner (no parameters). See the module doc for the choices."""

    loss_names = (MARGINAL_IMAGE, MARGINAL_QUERY, CONDITIONAL)

    def __init__(self, token_pooling: str = "flatten", multipliers=DEFAULT_MULTIPLIERS,
                 estimator: str = "unbiased", conditional: str = "joint",
                 conditional_detach_boxes: bool = True, size_reweight: bool = False,
                 box_jacobian: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__(token_pooling, size_reweight, box_jacobian)
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown MMD estimator {estimator!r}; choose one of {ESTIMATORS}")
        if conditional not in CONDITIONAL_KINDS:
            raise ValueError(f"unknown conditional alignment {conditional!r}; choose one of {CONDITIONAL_KINDS}")
        if not multipliers or any(float(m) <= 0 for m in multipliers):
            raise ValueError(f"MMD bandwidth multipliers must be a non-empty list of positive numbers, got {multipliers}")
        self.multipliers = tuple(float(m) for m in multipliers)
        self.estimator = estimator
        self.conditional = conditional
        self.conditional_detach_boxes = bool(conditional_detach_boxes)

    def _mmd(self, s: torch.Tensor, t: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        if s.shape[0] < 2 or t.shape[0] < 2:
            return _zero_like_graph(s, t)
        return mk_mmd(s, t, self.multipliers, self.estimator, weights)

    def forward(self, src_out: Mapping[str, torch.Tensor], tgt_out: Mapping[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
        """Returns ``{align_marginal_image, align_marginal_query, align_conditional}`` (scalars, ``MMD^2``)."""
        self._check(src_out, tgt_out)
        p = self.token_pooling
        w = self._size_weights(src_out, tgt_out)
        losses = {
            # the image term is per pair, like the boxes that weight it; queries carry no size
            MARGINAL_IMAGE: self._mmd(pool_tokens(src_out["image_tokens"], p), pool_tokens(tgt_out["image_tokens"], p),
                                      w),
            MARGINAL_QUERY: self._mmd(pool_tokens(src_out["query_tokens"], p), pool_tokens(tgt_out["query_tokens"], p)),
        }
        fs, ft = self._conditional_fused(src_out), self._conditional_fused(tgt_out)
        if self.conditional == "fused":
            losses[CONDITIONAL] = self._mmd(fs, ft, w)
        elif fs.shape[0] < 2 or ft.shape[0] < 2:
            losses[CONDITIONAL] = _zero_like_graph(fs, ft)
        else:
            bs, bt = src_out["pred_boxes"], tgt_out["pred_boxes"]
            if self.conditional_detach_boxes:
                bs, bt = bs.detach(), bt.detach()
            losses[CONDITIONAL] = joint_mk_mmd([fs, bs], [ft, bt], self.multipliers, self.estimator, w)
        self.last_stats = {k: float(v.detach()) for k, v in losses.items()}
        if w is not None:
            self.last_stats["size_weight_ess"] = self._ess(w)
        return losses


def _discriminator(in_dim: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Linear(hidden, 1),
    )


class AdversarialAligner(DomainAligner):
    """Domain discriminators behind a gradient-reversal layer (DANN; CDAN for the conditional part).

    Its parameters (the discriminators) must be optimised together with the model; the GRL
    makes one ``loss.backward()`` train the discriminators to separate the domains and the
    model to confuse them. The GRL coefficient follows :func:`grl_coefficient` over the
    ``step`` buffer, which counts training-mode calls and is saved in the ``state_dict`` so a
    resumed run continues the schedule; :meth:`set_progress` overrides it.
    """

    loss_names = (ADVERSARIAL,)
    PARTS = ("image", "query", "conditional")

    def __init__(self, token_dim: int, num_tokens: int, fused_dim: int, token_pooling: str = "flatten",
                 hidden: int = 256, dropout: float = 0.1, parts: Mapping[str, float] | None = None,
                 grl_schedule: str = "dann", grl_gamma: float = 10.0, grl_max_steps: int = 1000,
                 grl_max_coeff: float = 1.0, conditional_detach_boxes: bool = True,
                 size_reweight: bool = False,
                 box_jacobian: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__(token_pooling, size_reweight, box_jacobian)
        parts = dict(parts) if parts is not None else {p: 1.0 for p in self.PARTS}
        unknown = set(parts) - set(self.PARTS)
        if unknown:
            raise ValueError(f"unknown discriminator parts {sorted(unknown)}; choose from {self.PARTS}")
        if not any(float(w) > 0 for w in parts.values()):
            raise ValueError("at least one discriminator part needs a positive weight")
        self.parts = {p: float(w) for p, w in parts.items() if float(w) > 0}
        tok_in = pooled_dim(num_tokens, token_dim, token_pooling)
        # The conditional input is the multilinear map fused (x) [box, 1]: the appended 1 keeps
        # the fused features themselves in the map, so it is never degenerate for small boxes.
        in_dims = {"image": tok_in, "query": tok_in, "conditional": fused_dim * 5}
        self.discriminators = nn.ModuleDict({p: _discriminator(in_dims[p], hidden, dropout) for p in self.parts})
        grl_coefficient(0, grl_max_steps, grl_schedule, grl_gamma, grl_max_coeff)  # validates the schedule
        self.grl_schedule, self.grl_gamma = grl_schedule, float(grl_gamma)
        self.grl_max_steps, self.grl_max_coeff = int(grl_max_steps), float(grl_max_coeff)
        self.conditional_detach_boxes = bool(conditional_detach_boxes)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._progress_override: float | None = None

    def set_progress(self, progress: float | None) -> None:
        """Pin the schedule's progress ``p`` in [0, 1] (None: back to the step counter)."""
        self._progress_override = None if progress is None else min(max(float(progress), 0.0), 1.0)

    @property
    def grl_coeff(self) -> float:
        """The GRL coefficient the next call will use."""
        if self._progress_override is not None:
            step = round(self._progress_override * self.grl_max_steps)
        else:
            step = int(self.step)
        return grl_coefficient(step, self.grl_max_steps, self.grl_schedule, self.grl_gamma, self.grl_max_coeff)

    def _features(self, out: Mapping[str, torch.Tensor], part: str) -> torch.Tensor:
        if part == "image":
            return pool_tokens(out["image_tokens"], self.token_pooling)
        if part == "query":
            return pool_tokens(out["query_tokens"], self.token_pooling)
        box = out["pred_boxes"].detach() if self.conditional_detach_boxes else out["pred_boxes"]
        box1 = torch.cat([box, box.new_ones(box.shape[0], 1)], dim=1)          # [B, 5]
        return torch.einsum("bf,bk->bfk", self._conditional_fused(out), box1).flatten(1)  # [B, d_f * 5]

    def forward(self, src_out: Mapping[str, torch.Tensor], tgt_out: Mapping[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
        """Returns ``{adversarial}``: the weighted mean BCE of the domain discriminators
        (source label 1, target 0), seen through the GRL by the model's features."""
        self._check(src_out, tgt_out)
        coeff = self.grl_coeff
        total = 0.0
        stats: dict[str, float] = {"grl_coeff": coeff}
        w = self._size_weights(src_out, tgt_out)
        if w is not None:
            stats["size_weight_ess"] = self._ess(w)
        for part, weight in self.parts.items():
            fs, ft = self._features(src_out, part), self._features(tgt_out, part)
            logits = self.discriminators[part](grad_reverse(torch.cat([fs, ft], dim=0), coeff)).squeeze(1)
            labels = torch.cat([logits.new_ones(fs.shape[0]), logits.new_zeros(ft.shape[0])])
            # size reweighting: the source pairs count by their size weight (queries have no size)
            sample_w = None if w is None or part == "query" else torch.cat([w.to(logits.dtype),
                                                                            logits.new_ones(ft.shape[0])])
            loss = F.binary_cross_entropy_with_logits(logits, labels, weight=sample_w)
            total = total + weight * loss
            stats[f"disc_acc_{part}"] = float(((logits.detach() > 0).float() == labels).float().mean())
        if self.training and torch.is_grad_enabled() and self._progress_override is None:
            self.step += 1
        self.last_stats = stats
        return {ADVERSARIAL: total / sum(self.parts.values())}


def build_aligner(cfg_adapt: Mapping[str, Any], *, token_dim: int, num_tokens: int, fused_dim: int,
                  box_jacobian: Callable[[torch.Tensor], torch.Tensor] | None = None) -> DomainAligner:
    """Build the aligner selected by ``cfg_adapt['aligner']`` (``mmd`` | ``adversarial``).

    Args:
        cfg_adapt: the ``adapt`` config section, or part of it (the rest from ``default.yaml``).
            Keys read: ``aligner``, ``token_pooling`` (flatten | mean | tokens), ``conditional``
            (joint | fused), ``conditional_detach_boxes``, ``size_reweight``, ``protect_box``
            (needs ``box_jacobian``),
            ``mmd: {multipliers, estimator}``,
            ``discriminator: {hidden, dropout, parts: {image, query, conditional},
            grl_schedule, grl_gamma, grl_max_steps, grl_max_coeff}``.
        token_dim: d of ``image_tokens``/``query_tokens`` ``[B, K, d]``.
        num_tokens: K.
        fused_dim: size of ``fused`` ``[B, d_f]``.
        box_jacobian: ``fused [B, d_f] -> [B, m, d_f]``, the box head's input directions
            (:meth:`~date_core.model.seekers.GroundingSeeker.box_jacobian`); used only under
            ``protect_box``.
    """
    cfg_adapt = config_section("adapt", cfg_adapt)  # a key not given takes default.yaml's value
    kind = cfg_adapt["aligner"]
    if bool(cfg_adapt["protect_box"]):
        if box_jacobian is None:
            raise ValueError("adapt.protect_box needs the model's box head: build the aligner with "
                             "build_aligner_for_model(cfg_adapt, model)")
    else:
        box_jacobian = None
    pooling = cfg_adapt["token_pooling"]
    detach = bool(cfg_adapt["conditional_detach_boxes"])
    size_reweight = bool(cfg_adapt["size_reweight"])
    if kind == "mmd":
        mmd_cfg = cfg_adapt["mmd"]
        return MMDAligner(token_pooling=pooling, multipliers=mmd_cfg["multipliers"], estimator=mmd_cfg["estimator"],
                          conditional=cfg_adapt["conditional"], conditional_detach_boxes=detach,
                          size_reweight=size_reweight, box_jacobian=box_jacobian)
    if kind == "adversarial":
        d = cfg_adapt["discriminator"]
        return AdversarialAligner(
            token_dim, num_tokens, fused_dim, token_pooling=pooling, hidden=int(d["hidden"]),
            dropout=float(d["dropout"]), parts=d["parts"],
            grl_schedule=d["grl_schedule"], grl_gamma=float(d["grl_gamma"]),
            grl_max_steps=int(d["grl_max_steps"]), grl_max_coeff=float(d["grl_max_coeff"]),
            conditional_detach_boxes=detach, size_reweight=size_reweight, box_jacobian=box_jacobian)
    raise ValueError(f"unknown adapt.aligner {kind!r}; choose one of {ALIGNER_KINDS}")


def build_aligner_for_model(cfg_adapt: Mapping[str, Any], model: nn.Module) -> DomainAligner:
    """:func:`build_aligner` with the feature sizes read from a DATE model's config
    (``hidden_size`` = d = the fused width, ``num_semantic_tokens`` = K) and, for
    ``protect_box``, its grounding seeker's :meth:`box_jacobian`; DDP/compiled wrappers are
    looked through."""
    from ..model import unwrap

    inner = unwrap(model)
    cfg = inner.config
    return build_aligner(cfg_adapt, token_dim=cfg.hidden_size, num_tokens=cfg.num_semantic_tokens,
                         fused_dim=cfg.hidden_size, box_jacobian=inner.grounding.box_jacobian)
