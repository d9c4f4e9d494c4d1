"""The semantics-aggregated feature extractor (one per modality).

K learnable semantic tokens cross-attend to an encoder's sequence and become the *concentrated*
features ``[B, K, d]``; the projected sequence itself stays available as the *comprehensive*
features ``[B, N, d]``. A Perceiver-style block: pre-norm cross-attention, then an MLP.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class CrossAttentionBlock(nn.Module):
    """``tokens [B, K, d]`` attend to ``memory [B, N, d]`` (padding where ``memory_mask`` is False)."""

    def __init__(self, d: int, heads: int, mlp_ratio: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(d)
        self.norm_kv = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.norm_mlp = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp_ratio * d), nn.GELU(), nn.Linear(mlp_ratio * d, d))

    def forward(self, tokens: Tensor, memory: Tensor, memory_mask: Tensor | None = None,
                residual: bool = True) -> Tensor:
        kv = self.norm_kv(memory)
        pad = None if memory_mask is None else ~memory_mask.bool()
        attended, _ = self.attn(self.norm_q(tokens), kv, kv, key_padding_mask=pad, need_weights=False)
        tokens = tokens + attended if residual else attended
        return tokens + self.mlp(self.norm_mlp(tokens))


class SemanticAggregator(nn.Module):
    """Encoder sequence ``[B, N, h]`` -> (concentrated ``[B, K, d]``, comprehensive ``[B, N, d]``).

    Args:
        in_dim: the encoder's width h.
        d: shared width.
        num_tokens: K, the number of semantic tokens.
    """

    def __init__(self, in_dim: int, d: int, num_tokens: int, heads: int, layers: int = 1,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(in_dim, d), nn.LayerNorm(d))
        self.semantic_tokens = nn.Parameter(torch.randn(1, num_tokens, d) * 0.02)
        self.blocks = nn.ModuleList(CrossAttentionBlock(d, heads, dropout=dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(d)

    def forward(self, sequence: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``sequence [B, N, h]``, ``mask [B, N]`` (1 = real token) -> (``[B, K, d]``, ``[B, N, d]``)."""
        comprehensive = self.proj(sequence)
        tokens = self.semantic_tokens.expand(sequence.shape[0], -1, -1).to(comprehensive.dtype)
        for i, block in enumerate(self.blocks):
            # no residual from the learned seeds into the first block: the seeds only choose what
            # to read, so every concentrated feature is a function of the input. With the residual,
            # the shared seeds dominate the tokens and the grounding loss inflates them until the
            # pooled retrieval embeddings collapse to one point (measured on ProductWorld).
            tokens = block(tokens, comprehensive, mask, residual=i > 0)
        return self.norm(tokens), comprehensive
