"""Model selection on the target domain, for sweeps: a labelled criterion and an unsupervised one.

- ``target_val/...``: the PR + PG metrics on the target validation split. It needs boxes on
  that split: labels the user must supply (a few hundred annotated target pairs). ProductWorld's
  ``live/val`` carries them.
- ``proxy/reliability``: unsupervised. The seeker's mean pseudo-label reliability on the target
  validation pairs, with the boxes never read: the EMA teacher labels every pair under the
  ``adapt.views`` views, and each pair scores (teacher confidence + agreement between the
  views) / 2, the pipeline's default reliability signals. A fixed definition (not the trial's
  own ``adapt.reliability``), so that trials are ranked by the same yardstick.

The proxy can be fooled (a seeker that is confidently and consistently wrong scores high), which
is why docs/sweeps-and-promotion.md reports how well it ranks trials against the labelled metric.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from date_core.adapt.selftrain import label_target_set
from date_core.adapt.views import build_views
from date_core.evaluation.evaluate import evaluate_split, load_for_eval, split_batches

#: the proxy's reliability: the pipeline's default signals at equal weight, whatever a trial sets
PROXY_RELIABILITY = {"confidence": 1.0, "agreement": 1.0}
TARGET_VAL, PROXY = "target_val", "proxy"


def target_val_metrics(model_dir: str | Path, cfg: Mapping[str, Any]) -> dict[str, float]:
    """``target_val/pr/...`` and ``target_val/pg/...`` on ``data.target_domain`` /
    ``data.val_split`` (NaN for pg/* when that split has no boxes); at most ``data.max_val_pairs``."""
    data = cfg["data"]
    ev = evaluate_split(model_dir, data["root"], data["target_domain"], data["val_split"],
                        limit=data.get("max_val_pairs"))
    return {f"{TARGET_VAL}/{k.split('/', 1)[1]}": float(v) for k, v in ev.metrics.items()}


def proxy_metrics(model_dir: str | Path, cfg: Mapping[str, Any], batch_size: int = 32) -> dict[str, float]:
    """``proxy/reliability`` (and its parts ``proxy/confidence``, ``proxy/agreement``) of the
    seeker at ``model_dir`` on the target validation pairs, boxes unread."""
    data, adapt = cfg["data"], cfg["adapt"]
    model, transform = load_for_eval(model_dir, data["root"])
    batches = (batch for _, batch in split_batches(data["root"], data["target_domain"], data["val_split"],
                                                   transform, batch_size, data.get("max_val_pairs")))
    fixed = {**dict(adapt), "reliability": PROXY_RELIABILITY, "sensitivity_pass": False}
    rnd = label_target_set(model, batches, build_views(adapt["views"]), 0, fixed, keep_annotations=False)
    return {f"{PROXY}/reliability": float(np.mean(rnd.reliability)),
            f"{PROXY}/confidence": float(np.mean(np.clip(rnd.predictions["confidence"], 0, 1))),
            f"{PROXY}/agreement": float(np.mean(rnd.predictions["agreement"]))}


def selection_metrics(model_dir: str | Path, cfg: Mapping[str, Any]) -> dict[str, float]:
    """Both criteria for one round's model (what a sweep's trial reports per round)."""
    return {**target_val_metrics(model_dir, cfg), **proxy_metrics(model_dir, cfg)}


def spearman(x: list[float] | np.ndarray, y: list[float] | np.ndarray) -> float:
    """Spearman's rank correlation (ties get their average rank); NaN with under 3 pairs or a
    constant side. Pairs with a NaN are dropped."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(np.corrcoef(_ranks(x), _ranks(y))[0, 1])


def _ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="stable")
    ranks = np.empty(v.size, np.float64)
    ranks[order] = np.arange(v.size, dtype=np.float64)
    for value in np.unique(v):  # ties: the average of their ranks
        tied = v == value
        ranks[tied] = ranks[tied].mean()
    return ranks
