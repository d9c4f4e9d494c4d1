"""The DATE product seeker: encoders, one semantics-aggregated extractor per modality, and the
two cooperative seekers (retrieval and grounding) sharing them.

Forward contract (the engine, the aligner and the runtime depend on it)::

    out = model(pixel_values [B,3,S,S], input_ids [B,L], attention_mask [B,L])
    out["image_emb"]    [B, D] L2-normalised          out["query_emb"]  [B, D] L2-normalised
    out["logit_scale"]  scalar, already exp'd          out["pred_boxes"] [B, 4] cxcywh in [0, 1]
    out["pred_conf"]    [B] in [0, 1] (predicted IoU)  out["pred_conf_logit"] [B]
    out["image_tokens"] [B, K, d] concentrated          out["query_tokens"] [B, K, d]
    out["fused"]        [B, d] image-query feature feeding the box head
    out["patch_logits"] [B, N] where the grounding seeker looks
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .aggregator import SemanticAggregator
from .config import ModelConfig
from .encoders import TextEncoder, VisionEncoder
from .seekers import GroundingSeeker, RetrievalSeeker


class DateModel(nn.Module):
    """See the module docstring for the forward contract."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.vision = VisionEncoder(config)
        self.text = TextEncoder(config)
        # a pretrained text encoder fixes the vocabulary; keep the config truthful for callers
        config.vocab_size = self.text.vocab_size
        d = config.hidden_size
        self.image_aggregator = SemanticAggregator(self.vision.hidden_size, d, config.num_semantic_tokens,
                                                   config.aggregator_heads, config.aggregator_layers, config.dropout)
        self.query_aggregator = SemanticAggregator(self.text.hidden_size, d, config.num_semantic_tokens,
                                                   config.aggregator_heads, config.aggregator_layers, config.dropout)
        self.retrieval = RetrievalSeeker(d, config.embed_dim, config.init_logit_scale, config.max_logit_scale)
        self.grounding = GroundingSeeker(d, config.fusion_heads, config.fusion_layers, config.fusion_mlp,
                                         config.dropout)

    # -- the three separately callable stages (re-ranking grounds queries against other images)
    def encode_image(self, pixel_values: Tensor) -> dict[str, Any]:
        """``pixel_values [B, 3, S, S]`` -> ``{"emb" [B, D], "tokens" [B, K, d], "patches" [B, N, d], "grid": G}``."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be [B, 3, S, S], got {tuple(pixel_values.shape)}")
        sequence, grid = self.vision(pixel_values)
        tokens, patches = self.image_aggregator(sequence)
        return {"emb": self.retrieval.embed_image(tokens), "tokens": tokens, "patches": patches, "grid": grid}

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Any]:
        """``input_ids, attention_mask [B, L]`` -> ``{"emb" [B, D], "tokens" [B, K, d], "sequence" [B, L, d], "mask"}``."""
        if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask "
                             f"{tuple(attention_mask.shape)} must both be [B, L]")
        sequence = self.text(input_ids, attention_mask)
        tokens, projected = self.query_aggregator(sequence, attention_mask)
        return {"emb": self.retrieval.embed_query(tokens), "tokens": tokens, "sequence": projected,
                "mask": attention_mask}

    def ground(self, image_enc: dict[str, Any], text_enc: dict[str, Any]) -> dict[str, Tensor]:
        """Ground query i of ``text_enc`` in image i of ``image_enc`` (same batch size B).

        Grounding starts from the retrieval seeker's query tokens (cooperation: both seekers
        train the same semantic tokens)."""
        if image_enc["patches"].shape[0] != text_enc["tokens"].shape[0]:
            raise ValueError("ground() pairs image i with query i: batch sizes differ")
        return self.grounding(text_enc["tokens"], image_enc["patches"], image_enc["grid"])

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        image_enc = self.encode_image(pixel_values)
        text_enc = self.encode_text(input_ids, attention_mask)
        out = self.ground(image_enc, text_enc)
        out.update(image_emb=image_enc["emb"], query_emb=text_enc["emb"],
                   logit_scale=self.retrieval.logit_scale(),
                   image_tokens=image_enc["tokens"], query_tokens=text_enc["tokens"])
        return out


def select(enc: dict[str, Any], index: Tensor) -> dict[str, Any]:
    """Index every batched tensor of an ``encode_*`` result along dim 0 (``grid`` is kept)."""
    return {k: (v[index] if isinstance(v, Tensor) and v.dim() > 0 else v) for k, v in enc.items()}


def unwrap(model: nn.Module) -> "DateModel":
    """The :class:`DateModel` inside a DDP / compiled wrapper."""
    while not isinstance(model, DateModel):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"not a DateModel: {type(model).__name__}")
        model = inner
    return model
