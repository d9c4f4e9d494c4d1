"""The plain dual encoder: DATE's two encoders, mean-pooled, one linear projection each.

The baseline against which DATE's semantic aggregators and seekers are measured (CLIP's recipe
on the same backbones): no semantic tokens, no grounding head, trained with the retrieval term
alone (:class:`date_core.training.losses.ContrastiveCriterion` through the same ``engine.train_step``).

Forward contract (the subset of :class:`~date_core.model.DateModel`'s that retrieval reads)::

    out = model(pixel_values [B,3,S,S], input_ids [B,L], attention_mask [B,L])
    out["image_emb"] [B, D] L2-normalised    out["query_emb"] [B, D] L2-normalised
    out["logit_scale"] scalar, already exp'd
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .encoders import TextEncoder, VisionEncoder


class DualEncoder(nn.Module):
    """See the module docstring. ``config`` is a DATE :class:`ModelConfig`: the encoder fields,
    ``embed_dim`` and the logit-scale fields are read; the aggregator and seeker fields are not."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.vision = VisionEncoder(config)
        self.text = TextEncoder(config)
        config.vocab_size = self.text.vocab_size
        self.image_head = nn.Sequential(nn.LayerNorm(self.vision.hidden_size),
                                        nn.Linear(self.vision.hidden_size, config.embed_dim))
        self.query_head = nn.Sequential(nn.LayerNorm(self.text.hidden_size),
                                        nn.Linear(self.text.hidden_size, config.embed_dim))
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(config.init_logit_scale)))
        self.max_log_scale = math.log(config.max_logit_scale)

    def encode_image(self, pixel_values: Tensor) -> dict[str, Any]:
        """``pixel_values [B, 3, S, S]`` -> ``{"emb" [B, D]}`` (mean of the patch features)."""
        sequence, _ = self.vision(pixel_values)
        return {"emb": F.normalize(self.image_head(sequence.mean(dim=1)).float(), dim=-1)}

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Any]:
        """``input_ids, attention_mask [B, L]`` -> ``{"emb" [B, D]}`` (mean over real tokens,
        the pooling MiniLM's sentence embeddings were trained with)."""
        sequence = self.text(input_ids, attention_mask)
        mask = attention_mask.to(sequence.dtype).unsqueeze(-1)
        pooled = (sequence * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return {"emb": F.normalize(self.query_head(pooled).float(), dim=-1)}

    def logit_scale(self) -> Tensor:
        return self.log_logit_scale.clamp(max=self.max_log_scale).exp()

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        return {"image_emb": self.encode_image(pixel_values)["emb"],
                "query_emb": self.encode_text(input_ids, attention_mask)["emb"],
                "logit_scale": self.logit_scale()}
