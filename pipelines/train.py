#!/usr/bin/env python
"""Supervised product retrieval + grounding training on Ray Train, tracked in MLflow.

Trains on ``data.source_domain`` / ``data.train_split`` of a prepared dataset, validates each
epoch on ``data.val_split``, checkpoints to ``runtime.storage`` (local or s3://), and registers
the final model as a new version of ``runtime.registered_model``.

  python pipelines/train.py --set data.root=runs/data/productworld --set train.epochs=2
  python pipelines/train.py --config my.yaml --set runtime.num_workers=4 --set runtime.use_gpu=true
  ray job submit --working-dir . -- python pipelines/train.py --config my.yaml

Re-running with the same --set runtime.run_name=NAME continues from that run's last checkpoint.
MLflow: MLFLOW_TRACKING_URI, else a local SQLite store at runs/mlflow.db.
"""
from __future__ import annotations

import json
import sys
import tempfile

from date_core import cli


def main(argv: list[str] | None = None) -> int:
    parser = cli.config_parser(__doc__)
    parser.add_argument("--out", metavar="DIR", help="also copy the final model folder here")
    args = parser.parse_args(argv)
    cfg = cli.resolve(args, "train")
    if args.dry_run:
        return 0
    cli.check_dataset(cfg, "train")

    from date_core.runtime import session, tracking
    from date_core.runtime.dataset import ensure_dataset
    from date_core.runtime.supervised import run_stage

    session.init_ray(cfg)
    ensure_dataset(cfg, "train")  # generates only at the embedded default's root (or when asked)
    name = session.run_name(cfg, "train")
    experiment_id = tracking.setup(cfg["runtime"]["experiment"])
    print(f"[train] run {name}: {cfg['runtime']['num_workers']} worker(s), gpu={cfg['runtime']['use_gpu']}, "
          f"storage {cfg['runtime']['storage']}", flush=True)
    # without --out the local model copy is temporary: the model lives in MLflow and Ray storage
    with tempfile.TemporaryDirectory(prefix=f"date-{name}-") as tmp, cli.stage_errors("train", name):
        result = run_stage(cfg, name, stage="train", experiment_id=experiment_id, out_dir=args.out or tmp)
    shown = {k: round(v, 4) for k, v in sorted(result.metrics.items()) if "/pr/" in k or "/pg/" in k}
    model = str(result.model_dir) if args.out else f"models:/{cfg['runtime']['registered_model']}/{result.version}"
    print(json.dumps({"run": name, "mlflow_run_id": result.run_id, "model": model,
                      "registered_version": result.version, "metrics": shown}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
