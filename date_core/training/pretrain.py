"""CAPTURE-style cross-modal pretraining of the DATE model (Product1M, ICCV 2021), on
image-caption pairs alone (no boxes): three named loss terms, weighted like the supervised ones.

- ``mlm``: masked language modelling. About ``mlm_prob`` of the caption's non-special tokens are
  chosen (at least one per caption); BERT's 80/10/10 rule replaces them by ``[MASK]``, a random
  token, or keeps them. The text sequence then cross-attends to the image patches (CAPTURE's
  hybrid stream: text tokens read the image) and a head over the tokenizer's vocabulary predicts
  the chosen tokens.
- ``mpm``: masked patch modelling. ``mpm_ratio`` of the image's patch cells are blanked *in
  pixels* (set to 0, the dataset mean after normalisation); the patch features of the blanked
  image, marked where blanked and given their grid position, cross-attend to the caption and
  then to each other, and regress the stop-gradient, per-patch layer-normalised encoder features
  of the *clean* image at the blanked cells.
- ``itc``: cross-modal contrastive, :func:`date_core.training.losses.info_nce` between the retrieval
  embeddings of ``encode_image`` and ``encode_text`` (pairs of one product are all positives).

All three read one forward pass of the masked image and the masked caption (as CAPTURE does:
the masking doubles as augmentation for ``itc``), plus a gradient-free pass of the clean image
that gives the ``mpm`` targets.

The pieces: :func:`mask_tokens`, :func:`mask_patches`, :class:`CaptureHeads`,
:class:`CapturePretrainer` (model + heads -> terms), :class:`CaptureCriterion` (weights, total),
:func:`pretrain_step` (one optimiser step, ``loss/<term>`` floats like
:func:`date_core.training.engine.train_step`) and :func:`pretrain_loop` (a plain in-process loop for tests
and benchmarks). The Ray Train stage is :mod:`date_core.runtime.pretraining`.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from date_core import batch as B
from date_core.training.losses import info_nce
from date_core.model import DateModel, unwrap
from date_core.model.aggregator import CrossAttentionBlock

PRETRAIN_TERMS = ("mlm", "mpm", "itc")
HEADS_FILE = "pretrain_heads.safetensors"
IGNORE = -100  # label of the tokens MLM does not predict (F.cross_entropy's ignore_index)


# ----------------------------------------------------------------------------- masking
@dataclass(frozen=True)
class TokenSpec:
    """What MLM needs of a tokenizer: vocabulary size, ``[MASK]`` id, and the special ids that
    are never masked nor drawn as random replacements ([CLS], [SEP], [PAD], [UNK], [MASK])."""

    vocab_size: int
    mask_id: int
    special_ids: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> "TokenSpec":
        mask_id = getattr(tokenizer, "mask_token_id", None)
        if mask_id is None:
            raise ValueError("MLM needs a tokenizer with a mask token ([MASK]); this one has none")
        return cls(len(tokenizer), int(mask_id), tuple(sorted(int(i) for i in tokenizer.all_special_ids)))


def mask_tokens(input_ids: Tensor, attention_mask: Tensor, spec: TokenSpec, prob: float = 0.15,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """BERT masking of ``input_ids [B, L]``: returns (masked ids ``[B, L]``, labels ``[B, L]``).

    Only real (``attention_mask`` 1), non-special tokens are candidates; each is chosen with
    probability ``prob`` and every caption with a candidate gets at least one. Chosen tokens
    become ``[MASK]`` (80%), a random non-special token (10%) or stay (10%); ``labels`` holds
    the original id there and -100 elsewhere. ``generator`` (a CPU generator) makes it repeatable.
    """
    device = input_ids.device
    special = torch.tensor(spec.special_ids, device=device, dtype=input_ids.dtype)
    candidate = attention_mask.bool() & ~torch.isin(input_ids, special)
    score = torch.rand(input_ids.shape, generator=generator).to(device)
    score = score.masked_fill(~candidate, 2.0)
    first = score == score.min(dim=1, keepdim=True).values  # the lowest-scored candidate of each row
    chosen = candidate & ((score < prob) | first)
    labels = input_ids.masked_fill(~chosen, IGNORE)
    rule = torch.rand(input_ids.shape, generator=generator).to(device)
    random_ids = torch.randint(0, spec.vocab_size, input_ids.shape, generator=generator).to(device)
    random_ids = torch.where(torch.isin(random_ids, special), input_ids, random_ids)  # never a special token
    masked = torch.where(chosen & (rule < 0.8), torch.full_like(input_ids, spec.mask_id), input_ids)
    masked = torch.where(chosen & (rule >= 0.8) & (rule < 0.9), random_ids, masked)
    return masked, labels


def mask_patches(pixel_values: Tensor, grid: int, ratio: float,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Blank ``ratio`` of the ``grid x grid`` patch cells of ``pixel_values [B, 3, S, S]``
    (at least one per image): returns (blanked pixels ``[B, 3, S, S]``, mask ``[B, N]`` bool,
    ``N = grid * grid``, row-major like the encoder's patch tokens). Blanked pixels are 0, the
    dataset mean after normalisation."""
    b, n = pixel_values.shape[0], grid * grid
    k = min(n, max(1, int(round(ratio * n))))
    order = torch.rand(b, n, generator=generator).argsort(dim=1)[:, :k]
    mask = torch.zeros(b, n, dtype=torch.bool).scatter_(1, order, True).to(pixel_values.device)
    cells = F.interpolate(mask.view(b, 1, grid, grid).float(), size=pixel_values.shape[-2:], mode="nearest")
    return pixel_values * (1.0 - cells).to(pixel_values.dtype), mask


def grid_positions(grid: int, d: int, device: torch.device | str = "cpu") -> Tensor:
    """Fixed 2-D sin-cos position features ``[grid * grid, d]`` (row-major), for any grid."""
    quarter = max(1, d // 4)
    freq = torch.exp(-math.log(10000.0) * torch.arange(quarter, device=device) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid, device=device), torch.arange(grid, device=device), indexing="ij")
    parts = []
    for coord in (xs.flatten().float(), ys.flatten().float()):
        angle = coord[:, None] * freq[None]
        parts += [angle.sin(), angle.cos()]
    pos = torch.cat(parts, dim=1)
    return F.pad(pos, (0, d - pos.shape[1])) if pos.shape[1] < d else pos[:, :d]


# ----------------------------------------------------------------------------- heads
class CaptureHeads(nn.Module):
    """The pretraining heads on top of :class:`DateModel` (dropped, or kept beside the
    checkpoint, after pretraining).

    Args:
        d: the model's shared width (``hidden_size``).
        vision_width: the image encoder's own width h (the ``mpm`` target's width).
        vocab_size: the tokenizer's vocabulary (the ``mlm`` classes).
        heads: attention heads of the fusion blocks.
        layers: fusion blocks per stream.
    """

    def __init__(self, d: int, vision_width: int, vocab_size: int, heads: int, layers: int = 1) -> None:
        super().__init__()
        self.text_fusion = nn.ModuleList(CrossAttentionBlock(d, heads) for _ in range(layers))   # text -> patches
        self.mlm_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d), nn.Linear(d, vocab_size))
        self.patch_fusion = nn.ModuleList(CrossAttentionBlock(d, heads) for _ in range(layers))  # patches -> text
        self.patch_context = nn.ModuleList(CrossAttentionBlock(d, heads) for _ in range(layers))  # patches -> patches
        self.mask_embed = nn.Parameter(torch.zeros(d))
        self.mpm_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d), nn.Linear(d, vision_width))

    def mlm_logits(self, text_seq: Tensor, patches: Tensor, chosen: Tensor) -> Tensor:
        """``text_seq [B, L, d]`` reads ``patches [B, N, d]``; logits ``[M, V]`` of the ``M``
        positions where ``chosen [B, L]`` is True (the others are never scored: cheaper)."""
        h = text_seq
        for block in self.text_fusion:
            h = block(h, patches)
        return self.mlm_head(h[chosen])

    def mpm_prediction(self, patches: Tensor, grid: int, blanked: Tensor, text_seq: Tensor,
                       text_mask: Tensor) -> Tensor:
        """``patches [B, N, d]`` of the blanked image, ``blanked [B, N]``; the caption
        ``text_seq [B, L, d]`` / ``text_mask [B, L]`` -> predictions ``[M, h]`` at the M blanked cells."""
        h = patches + grid_positions(grid, patches.shape[-1], patches.device).to(patches.dtype)[None]
        h = h + blanked[..., None].to(h.dtype) * self.mask_embed.to(h.dtype)
        for cross, ctx in zip(self.patch_fusion, self.patch_context):
            h = cross(h, text_seq, text_mask)
            h = ctx(h, h)
        return self.mpm_head(h[blanked])


# ----------------------------------------------------------------------------- model + losses
class CapturePretrainer(nn.Module):
    """:class:`DateModel` + :class:`CaptureHeads`: ``pretrainer(batch)`` -> (terms, stats).

    ``batch``: ``pixel_values [B, 3, S, S]``, ``input_ids`` / ``attention_mask [B, L]``
    (optional ``item_key [B]``). ``terms``: unweighted scalar tensors ``mlm``, ``mpm``, ``itc``
    (those whose weight in ``active`` is non-zero); ``stats``: detached floats (``mlm_acc``,
    the accuracy on the masked tokens). One module so that DDP wraps model and heads together.
    """

    def __init__(self, model: DateModel, spec: TokenSpec, *, mlm_prob: float = 0.15, mpm_ratio: float = 0.3,
                 fusion_layers: int = 1, heads: CaptureHeads | None = None, active: Iterable[str] = PRETRAIN_TERMS,
                 gather: bool = True) -> None:
        super().__init__()
        model = unwrap(model)
        if spec.vocab_size > model.text.vocab_size:
            raise ValueError(f"the tokenizer has {spec.vocab_size} tokens, the text encoder {model.text.vocab_size}")
        self.model = model
        self.spec = spec
        self.heads = heads or CaptureHeads(model.config.hidden_size, model.vision.hidden_size, spec.vocab_size,
                                           model.config.aggregator_heads, fusion_layers)
        self.mlm_prob, self.mpm_ratio, self.gather = float(mlm_prob), float(mpm_ratio), gather
        self.active = tuple(active)

    def forward(self, batch: Mapping[str, Tensor], generator: torch.Generator | None = None
                ) -> tuple[dict[str, Tensor], dict[str, float]]:
        model, heads = self.model, self.heads
        pixels, ids, attn = batch[B.PIXEL_VALUES], batch[B.INPUT_IDS], batch[B.ATTENTION_MASK]
        # mpm targets: the clean image's own encoder features, without gradient. Why this target
        # cannot be copied: the blanked cells' pixels never reach the predicting pass, and it is
        # taken before the shared projection (per-patch LayerNorm, no affine) so the model cannot
        # shrink the target to make it easy; ``itc`` and ``mlm`` keep the features informative.
        with torch.no_grad():
            clean, grid = model.vision(pixels)
            target = F.layer_norm(clean.float(), clean.shape[-1:])
        blanked_px, blanked = mask_patches(pixels, grid, self.mpm_ratio, generator)
        masked_ids, labels = mask_tokens(ids, attn, self.spec, self.mlm_prob, generator)
        image = model.encode_image(blanked_px)      # emb [B, D], patches [B, N, d]
        text = model.encode_text(masked_ids, attn)  # emb [B, D], sequence [B, L, d]
        terms: dict[str, Tensor] = {}
        stats: dict[str, float] = {}
        if "mlm" in self.active:
            chosen = labels != IGNORE
            logits = heads.mlm_logits(text["sequence"], image["patches"], chosen)  # [M, V]
            truth = labels[chosen]
            if truth.numel():
                terms["mlm"] = F.cross_entropy(logits.float(), truth)
                stats["mlm_acc"] = float((logits.argmax(-1) == truth).float().mean().detach())
            else:  # no maskable token in the whole batch (captions of special tokens only)
                terms["mlm"] = logits.float().sum() * 0.0
        if "mpm" in self.active:
            pred = heads.mpm_prediction(image["patches"], grid, blanked, text["sequence"], attn)  # [M, h]
            terms["mpm"] = F.mse_loss(pred.float(), target[blanked])
        if "itc" in self.active:
            terms["itc"] = info_nce(image["emb"], text["emb"], model.retrieval.logit_scale(),
                                    batch.get(B.ITEM_KEY), gather=self.gather)
        return terms, stats


class CaptureCriterion:
    """Weights of the pretraining terms (``pretrain.loss`` of the config); ``total(terms)`` is
    their weighted sum. Unknown names are refused; a 0 weight switches a term off."""

    def __init__(self, weights: Mapping[str, float] | None = None) -> None:
        self.weights = {name: 1.0 for name in PRETRAIN_TERMS}
        for name, value in (weights or {}).items():
            if name not in PRETRAIN_TERMS:
                raise KeyError(f"unknown pretraining loss term {name!r}; known terms: {PRETRAIN_TERMS}")
            self.weights[name] = float(value)
        if not any(self.weights.values()):
            raise ValueError("every pretraining loss weight is 0: nothing to train")

    @property
    def active(self) -> tuple[str, ...]:
        return tuple(name for name in PRETRAIN_TERMS if self.weights[name] != 0.0)

    def total(self, terms: Mapping[str, Tensor]) -> Tensor:
        return sum(self.weights[name] * value for name, value in terms.items())


def build_pretrainer(model: DateModel, tokenizer: Any, pcfg: Mapping[str, Any] | None = None
                     ) -> tuple[CapturePretrainer, CaptureCriterion]:
    """The pretrainer and criterion of a ``pretrain:`` config section (defaults: the packaged ones)."""
    pcfg = pretrain_config(pcfg)
    criterion = CaptureCriterion(pcfg.get("loss"))
    pretrainer = CapturePretrainer(model, TokenSpec.from_tokenizer(tokenizer), mlm_prob=pcfg["mlm_prob"],
                                   mpm_ratio=pcfg["mpm_ratio"], fusion_layers=pcfg["fusion_layers"],
                                   active=criterion.active)
    return pretrainer, criterion


def pretrain_config(pcfg: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``pretrain:`` section of ``date_core/configs/default.yaml`` with ``pcfg`` merged over it."""
    from date_core.config import config_section

    return config_section("pretrain", pcfg)


def pretrain_train_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A whole run config's training settings for pretraining: ``train`` with ``pretrain.train`` over it."""
    return {**dict(cfg["train"]), **dict(cfg["pretrain"]["train"] or {})}


# ----------------------------------------------------------------------------- steps and loop
def pretrain_step(pretrainer: nn.Module, criterion: CaptureCriterion, batch: Mapping[str, Any],
                  optimizer: torch.optim.Optimizer, scheduler: Any = None, *, generator: torch.Generator | None = None,
                  grad_accum: int = 1, micro_step: int = 0, autocast_dtype: torch.dtype | None = None,
                  device: str | torch.device = "cpu", max_grad_norm: float | None = 1.0) -> dict[str, float]:
    """One micro-step of pretraining (``pretrainer``: a :class:`CapturePretrainer`, possibly
    DDP-wrapped); the optimiser steps every ``grad_accum`` micro-steps. Returns floats
    ``loss/mlm``, ``loss/mpm``, ``loss/itc`` (the active ones), ``loss/total``, ``mlm_acc``,
    ``lr``, ``grad_norm`` (when stepping) and ``stepped`` (1.0 when the optimiser stepped)."""
    from date_core.training.engine import _autocast, optimizer_update, to_device

    device = torch.device(device)
    pretrainer.train()
    stepping = (micro_step + 1) % grad_accum == 0
    sync = contextlib.nullcontext() if stepping or not hasattr(pretrainer, "no_sync") else pretrainer.no_sync()
    with sync:
        with _autocast(device, autocast_dtype):
            terms, stats = pretrainer(to_device(batch, device), generator)
            total = criterion.total(terms)
        logs = {f"loss/{k}": float(v.detach()) for k, v in terms.items()}
        logs.update(stats)
        if not torch.isfinite(total):
            raise FloatingPointError(f"non-finite pretraining loss {float(total)}; terms: {logs}")
        (total / grad_accum).backward()
    logs["loss/total"] = float(total.detach())
    logs.update(optimizer_update(optimizer, scheduler, stepping, max_grad_norm))
    return logs


def pretrain_loop(model: DateModel, batches_factory: Callable[[], Iterable[Mapping[str, Any]]], steps: int,
                  cfg: Mapping[str, Any] | None = None, *, tokenizer: Any, device: str | torch.device = "cpu",
                  autocast_dtype: torch.dtype | None = None, seed: int = 0,
                  history: list[dict[str, float]] | None = None,
                  callback: Callable[[int, dict[str, float]], None] | None = None) -> DateModel:
    """Pretrain ``model`` in place for ``steps`` optimiser steps and return it (in-process, no Ray).

    ``batches_factory()`` gives one pass of batches (dicts of ``pixel_values``, ``input_ids``,
    ``attention_mask``, optionally ``item_key``; tensors or numpy), restarted as often as
    needed. ``cfg``: the ``pretrain:`` section (loss weights, ``mlm_prob``, ``mpm_ratio``,
    ``fusion_layers``, and ``train`` for the optimiser: ``lr``, ``weight_decay``,
    ``encoder_lr_mult``, ``warmup_steps``, ``grad_accum``); missing keys take the packaged
    defaults. ``tokenizer``: the one that made ``input_ids`` (its ``[MASK]`` and special ids).
    Each step's logs (:func:`pretrain_step`) are appended to ``history`` when given. The heads
    are dropped; :func:`build_pretrainer` + :func:`pretrain_step` keep them.
    """
    from date_core.training.engine import build_optimizer, schedule_from_config

    pcfg = pretrain_config(cfg)
    tcfg = {"lr": 1e-3, "weight_decay": 0.05, "warmup_steps": 0, **dict(pcfg.get("train") or {})}
    pretrainer, criterion = build_pretrainer(model, tokenizer, pcfg)
    pretrainer.to(device)
    optimizer = build_optimizer(pretrainer.model, tcfg, extra_modules=[pretrainer.heads])
    scheduler = schedule_from_config(optimizer, tcfg, steps)
    grad_accum = int(tcfg.get("grad_accum") or 1)
    generator = torch.Generator().manual_seed(int(seed))
    step = micro = 0
    while step < steps:
        seen = 0
        for batch in batches_factory():
            seen += 1
            logs = pretrain_step(pretrainer, criterion, batch, optimizer, scheduler, generator=generator,
                                 grad_accum=grad_accum, micro_step=micro, autocast_dtype=autocast_dtype, device=device)
            micro += 1
            if not logs["stepped"]:
                continue
            step += 1
            logs["step"] = float(step)
            if history is not None:
                history.append(logs)
            if callback is not None:
                callback(step, logs)
            if step >= steps:
                break
        if seen == 0:
            raise ValueError("batches_factory() gave no batches")
    return pretrainer.model.eval()


__all__ = ["PRETRAIN_TERMS", "TokenSpec", "mask_tokens", "mask_patches", "CaptureHeads", "CapturePretrainer",
           "CaptureCriterion", "build_pretrainer", "pretrain_config", "pretrain_step", "pretrain_loop"]
