"""The two cooperative seekers.

- :class:`RetrievalSeeker`: pools the K concentrated tokens of each modality into one
  L2-normalised embedding; similarity is cosine times a learnable temperature.
- :class:`GroundingSeeker`: a cross-modal transformer over the query's semantic tokens and the
  image's patch tokens that regresses one box and a confidence predicting that box's IoU.

The box head is built to be well conditioned when trained from scratch: instead of regressing
four numbers from a global vector (slow: the network must invent a coordinate system), each
patch scores how well it matches the query, the box centre is the score-weighted mean of the
patch centres (soft-argmax) plus a bounded refinement, and the size comes from the attended
feature. Patches carry explicit sin-cos coordinate features.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RetrievalSeeker(nn.Module):
    """Concentrated tokens ``[B, K, d]`` -> L2-normalised embedding ``[B, D]``, one head per modality."""

    def __init__(self, d: int, embed_dim: int, init_logit_scale: float, max_logit_scale: float) -> None:
        super().__init__()
        self.image_head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, embed_dim))
        self.query_head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, embed_dim))
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(init_logit_scale)))
        self.max_log_scale = math.log(max_logit_scale)

    def embed_image(self, tokens: Tensor) -> Tensor:
        return F.normalize(self.image_head(tokens.mean(dim=1)).float(), dim=-1)

    def embed_image_tokens(self, tokens: Tensor) -> Tensor:
        """``[B, K, d]`` -> ``[B, K, D]`` L2-normalised: each concentrated token through the
        image head on its own (instance-level retrieval reads them as product slots)."""
        return F.normalize(self.image_head(tokens).float(), dim=-1)

    def embed_query(self, tokens: Tensor) -> Tensor:
        return F.normalize(self.query_head(tokens.mean(dim=1)).float(), dim=-1)

    def logit_scale(self) -> Tensor:
        """The temperature, exp'd and clamped (CLIP caps it at 100 to keep training stable)."""
        return self.log_logit_scale.clamp(max=self.max_log_scale).exp()


#: octaves of the coordinate features that float32 can hold (pi * 2^126 < 3.4e38 < pi * 2^127)
MAX_OCTAVES = 127


def sincos_coordinates(grid: int, dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Patch centres of a ``grid x grid`` layout -> (``[N, 2]`` centres in [0, 1] (x, y),
    ``[N, dim]`` sin-cos features of them)."""
    idx = (torch.arange(grid, device=device, dtype=torch.float32) + 0.5) / grid
    cy, cx = torch.meshgrid(idx, idx, indexing="ij")
    centres = torch.stack([cx.flatten(), cy.flatten()], dim=-1)
    # Octave frequencies pi * 2^k. Past k = 126 they overflow float32 (inf -> sin/cos NaN: the
    # 768-wide base preset produced NaN boxes from its first step), so the rest is zero-padded; every
    # width below 512 is unchanged.
    n_freq = min(dim // 4, MAX_OCTAVES)
    freqs = (2.0 ** torch.arange(n_freq, device=device, dtype=torch.float32)) * math.pi
    angles = centres[:, :, None] * freqs  # [N, 2, F]
    feats = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1)  # [N, 4F]
    if feats.shape[1] < dim:
        feats = F.pad(feats, (0, dim - feats.shape[1]))
    return centres, feats


class GroundingSeeker(nn.Module):
    """Query tokens ``[B, K, d]`` + image patches ``[B, N, d]`` (grid G x G) -> box, confidence.

    Outputs: ``pred_boxes [B, 4]`` (cx, cy, w, h) in [0, 1]; ``pred_conf [B]`` in [0, 1] and its
    logit; ``fused [B, d]`` (the query-conditioned feature feeding the box head); ``patch_logits
    [B, N]`` (where the seeker looks).
    """

    def __init__(self, d: int, heads: int, layers: int, mlp: int, dropout: float = 0.0,
                 max_refine_cells: float = 1.5) -> None:
        super().__init__()
        self.reg_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.type_query = nn.Parameter(torch.zeros(1, 1, d))
        self.type_patch = nn.Parameter(torch.zeros(1, 1, d))
        self.coord_proj = nn.Linear(d, d)
        layer = nn.TransformerEncoderLayer(d, heads, mlp, dropout=dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.fusion = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.patch_score = nn.Linear(d, 1)
        # a direct bilinear match between each patch and the pooled query, beside the fusion:
        # multiplicative query-patch interaction from the first step, which a generic
        # transformer otherwise has to discover (slow from scratch)
        self.match_patch = nn.Linear(d, d, bias=False)
        self.match_query = nn.Linear(d, d, bias=False)
        self.refine = nn.Linear(d, 2)
        self.size = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 2))
        self.conf = nn.Sequential(nn.Linear(d + 4, d), nn.GELU(), nn.Linear(d, 1))
        self.max_refine_cells = max_refine_cells
        # start near a plausible product size (about a third of the frame) with no refinement;
        # small rather than zero weights so every layer gets a gradient from the first step
        nn.init.normal_(self.size[-1].weight, std=1e-3)
        nn.init.constant_(self.size[-1].bias, math.log(0.3 / 0.7))
        nn.init.normal_(self.refine.weight, std=1e-3)
        nn.init.zeros_(self.refine.bias)

    def box_jacobian(self, fused: Tensor) -> Tensor:
        """``fused [B, d]`` -> ``[B, 4, d]``: for each pair, the gradient with respect to ``fused``
        of the four box outputs that read it (the two size logits and the two centre
        refinements). Alignment can project its gradient off these rows
        (``adapt.protect_box``). Computed in float32 on a detached copy: no parameter receives a
        gradient from it."""
        with torch.enable_grad(), torch.autocast(fused.device.type, enabled=False):
            f = fused.detach().float().requires_grad_(True)
            out = torch.cat([self.size(f), self.refine(f)], dim=-1)  # [B, 4]
            rows = [torch.autograd.grad(out[:, j].sum(), f, retain_graph=j < 3)[0] for j in range(4)]
        return torch.stack(rows, dim=1)

    def forward(self, query_tokens: Tensor, patches: Tensor, grid: int) -> dict[str, Tensor]:
        b, k, d = query_tokens.shape
        n = patches.shape[1]
        if n != grid * grid:
            raise ValueError(f"{n} patches do not form a {grid}x{grid} grid")
        centres, coord_feats = sincos_coordinates(grid, d, patches.device)
        match = torch.einsum("bnd,bd->bn", self.match_patch(patches),
                             self.match_query(query_tokens.mean(dim=1))).float() / math.sqrt(d)
        patches = patches + self.type_patch + self.coord_proj(coord_feats.to(patches.dtype))[None]
        seq = torch.cat([self.reg_token.expand(b, -1, -1).to(patches.dtype),
                         query_tokens + self.type_query, patches], dim=1)
        out = self.norm(self.fusion(seq))
        reg, patch_out = out[:, 0], out[:, 1 + k:]
        patch_logits = self.patch_score(patch_out).squeeze(-1).float() + match  # [B, N]
        weights = patch_logits.softmax(dim=-1)
        fused = reg + torch.einsum("bn,bnd->bd", weights.to(patch_out.dtype), patch_out)
        centre = weights @ centres  # [B, 2] soft-argmax over patch centres
        centre = centre + torch.tanh(self.refine(fused).float()) * (self.max_refine_cells / grid)
        size = torch.sigmoid(self.size(fused).float())
        boxes = torch.cat([centre.clamp(0.0, 1.0), size], dim=-1)
        # the confidence reads the box but must not move it: its loss only teaches calibration
        conf_logit = self.conf(torch.cat([fused, boxes.detach().to(fused.dtype)], dim=-1)).squeeze(-1).float()
        return {"pred_boxes": boxes, "pred_conf": torch.sigmoid(conf_logit), "pred_conf_logit": conf_logit,
                "fused": fused, "patch_logits": patch_logits}


def combine_scores(similarity: Tensor, confidence: Tensor, weight: float) -> Tensor:
    """The cooperative seekers' ranking score: retrieval similarity + ``weight`` x grounding
    confidence (the predicted IoU of the product's box in the candidate). Any matching shapes."""
    return similarity + weight * confidence


@torch.no_grad()
def rerank_by_grounding(model: nn.Module, text_enc: dict, candidate_image_enc: dict, scores: Tensor,
                        weight: float = 1.0) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Cooperation at inference: re-rank each query's top-k by the grounding seeker's confidence.

    ``text_enc``: ``model.encode_text`` of Q queries; ``candidate_image_enc``: ``model.encode_image``
    of the Q*k candidate images, query-major (query q's candidates at rows q*k .. q*k+k-1);
    ``scores [Q, k]`` retrieval similarities. New score = similarity + ``weight`` * confidence.
    Returns (``[Q, k]`` new scores sorted best first, ``[Q, k]`` permutation of the original
    top-k positions, grounding outputs ``[Q, k, ...]`` in the new order).
    """
    q, k = scores.shape
    rows = torch.arange(q, device=scores.device).repeat_interleave(k)
    text_rep = {key: (v[rows] if isinstance(v, Tensor) and v.dim() > 0 else v) for key, v in text_enc.items()}
    grounded = model.ground(candidate_image_enc, text_rep)
    conf = grounded["pred_conf"].view(q, k)
    combined = combine_scores(scores, conf, weight)
    order = combined.argsort(dim=1, descending=True, stable=True)
    reordered = {key: v.view(q, k, *v.shape[1:]).gather(
        1, order.view(q, k, *([1] * (v.dim() - 1))).expand(q, k, *v.shape[1:]))
        for key, v in grounded.items()}
    return combined.gather(1, order), order, reordered
