"""One supervised (or adaptation-round) training stage, driver side: MLflow run, Ray Train
fit, the final model's evaluation figures, and its registration.

``pipelines/train.py`` calls :func:`run_stage` once; ``pipelines/pgda.py`` once per round.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from date_core.config_types import to_dict
from date_core.evaluation.evaluate import evaluate_split, samples_in_pixels
from date_core.evaluation.figures import prediction_grid, recall_plot
from date_core.runtime import session, tracking
from date_core.runtime.budget import reserve_streams
from date_core.runtime.trainer import (build_trainer, checkpoint_model_dir, checkpoint_step as metrics_step, data_streams,
                                      init_model, make_datasets)


@dataclass
class StageResult:
    run_id: str
    model_dir: Path            # local copy of the final model folder
    metrics: dict[str, Any]    # the last reported metrics (train + validation, worker_nodes)
    start_step: int            # step the last attempt started from (0 = from scratch)
    version: str | None = None


def run_stage(cfg: Mapping[str, Any], name: str, *, stage: str = "train", experiment_id: str,
              parent_run_id: str | None = None, target: Callable[[float | None], Any] | None = None,
              align: bool = False, init_from: str | None = None,
              register: bool = True, out_dir: str | Path) -> StageResult:
    """Train one stage called ``name`` and return its final model.

    Re-running with the same ``name`` continues from the stage's last checkpoint (Ray Train
    restores it from ``runtime.storage/<name>``) and logs into the same MLflow run. The final
    model folder (and the figures) are written under ``out_dir``, which the caller owns and removes.
    ``target(num_cpus)``: builds an adaptation round's target rows (see
    :func:`~date_core.runtime.trainer.make_datasets`). Each data stream runs in its own CPU
    budget (:mod:`date_core.runtime.budget`), reserved for the stage and released after it.
    """
    from date_core.model import resolve_model_config

    uri = tracking.tracking_uri()
    run_id, resumed = tracking.start_or_resume(experiment_id, name, stage, parent_run_id, uri)
    tracking.log_config(run_id, cfg, uri)
    print(f"[{stage}] MLflow run {run_id} ({'resumed' if resumed else 'new'}) at {uri}", flush=True)

    tok = session.tokenizer_dir(cfg)
    vocab = session.vocab_size(tok)
    # model.init_from (e.g. pretrained weights) starts a stage that does not continue another
    # model; checked here, before Ray Train starts, and logged as the run's init_from.* params
    init_weights = None if init_from else cfg["model"].get("init_from")
    if init_weights:
        try:
            tracking.log_init_source(run_id, init_weights, uri)
            init_model(cfg, vocab, init_weights, uri)
        except Exception:
            tracking.end_run(run_id, "FAILED", uri)
            raise
        print(f"[{stage}] initial weights from model.init_from={init_weights}", flush=True)
    model_cfg = resolve_model_config(cfg["model"]["preset"], **(cfg["model"].get("overrides") or {})).to_dict()
    streams, shares = data_streams(target is not None)
    try:
        with reserve_streams(cfg, streams, shares=shares) as budgets:
            datasets, counts = make_datasets(cfg, model_cfg, tok, target=target, budgets=budgets)
            print(f"[{stage}] rows: " + ", ".join(f"{k}={v}" for k, v in counts.items())
                  + f"; data streams: {budgets.describe()}", flush=True)
            loop_cfg = {"cfg": dict(cfg), "tokenizer": tok, "vocab_size": vocab, "counts": counts,
                        "mlflow": {"uri": uri, "run_id": run_id}, "init_from": init_from, "init_weights": init_weights,
                        "align": align, "tag": f"{cfg['data']['source_domain']}_{cfg['data']['val_split']}"}
            result = build_trainer(cfg, name, datasets, loop_cfg).fit()
    except Exception:
        tracking.end_run(run_id, "FAILED", uri)
        raise
    if result.checkpoint is None:
        tracking.end_run(run_id, "FAILED", uri)
        raise RuntimeError(f"stage {name} finished without a checkpoint")

    # required: the caller owns (and removes) the folder the final model is copied into
    out_dir = Path(out_dir)
    # an adaptation round's output is its EMA teacher (it labelled the target and is what is kept)
    model_dir = checkpoint_model_dir(result.checkpoint, out_dir / "model", prefer_teacher=target is not None)
    metrics = dict(result.metrics or {})
    _log_figures(cfg, run_id, model_dir, out_dir, uri)
    version = None
    if register:
        version = tracking.log_and_register(run_id, model_dir, cfg["runtime"]["registered_model"], metrics, uri)
        print(f"[{stage}] registered {cfg['runtime']['registered_model']} version {version}", flush=True)
    tracking.end_run(run_id, "FINISHED", uri)
    return StageResult(run_id, model_dir, metrics, int(metrics.get("start_step", 0)), version)


def _log_figures(cfg: Mapping[str, Any], run_id: str, model_dir: Path, out_dir: Path, uri: str) -> None:
    """Config file, a PNG grid of validation predictions and a recall@k plot, as artifacts."""
    import mlflow

    data = cfg["data"]
    ev = evaluate_split(model_dir, data["root"], data["source_domain"], data["val_split"],
                        limit=int(data.get("max_val_pairs") or 512))
    images, queries, true_px, pred_px = samples_in_pixels(ev, json.loads((model_dir / "config.json").read_text())
                                                          ["model"]["image_size"])
    figs = out_dir / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    prediction_grid(images, queries, true_px, pred_px, figs / "val_predictions.png")
    recall_plot({f"{data['source_domain']}_{data['val_split']}": ev.recall_at}, figs / "val_recall_at_k.png")
    (figs / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_artifacts(str(figs))
    tracking.log_metrics(run_id, ev.metrics, step=int(metrics_step(model_dir)), uri=uri)
