"""The DATE model: presets, encoders, semantic aggregators and the two seekers.

``build_model(preset_or_config, **overrides)`` is the one factory: a preset name (``lite``,
``tiny``, ``small``, ``base``), a preset YAML path, a dict of fields (or a pipeline ``model:`` section
with ``preset`` / ``overrides``), or a :class:`ModelConfig`.
"""
from __future__ import annotations

from typing import Any

from .config import PRESETS, ModelConfig, load_preset, resolve_model_config
from .date_model import DateModel, select, unwrap
from .encoders import minilm_path, pretrained_tokenizer_dir

__all__ = ["PRESETS", "ModelConfig", "DateModel", "build_model", "load_preset", "minilm_path", "pretrained_tokenizer_dir",
           "resolve_model_config", "select", "unwrap"]


def build_model(preset_or_config: Any = "tiny", **overrides: Any) -> DateModel:
    """Build a :class:`DateModel` (randomly initialised unless the config names local
    pretrained encoders). Example: ``build_model("tiny", vocab_size=len(tokenizer))``."""
    return DateModel(resolve_model_config(preset_or_config, **overrides))
