"""DATE (Domain Adaptive Product Seeker): the library.

The core (model, data, losses, metrics, adaptation) never imports ray or mlflow; the Ray
and MLflow glue lives in :mod:`date_core.runtime`.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["build_model", "load_seeker", "__version__"]


def build_model(preset_or_config: Any = "tiny", **overrides: Any):
    """Build the DATE model from a preset name (``tiny``/``small``/``base``), a preset YAML path,
    or a config dict, with field overrides. See :mod:`date_core.model`."""
    from .model import build_model as _build

    return _build(preset_or_config, **overrides)


def load_seeker(model: str, **kwargs: Any):
    """Load a seeker (``encode_queries``, ``encode_images``, ``search``, ``ground``) from a local
    checkpoint folder. See :mod:`date_core.inference`."""
    from .inference import load_seeker as _load

    return _load(model, **kwargs)
