#!/usr/bin/env python
"""CAPTURE-style cross-modal pretraining (Product1M, ICCV 2021) of the DATE model on Ray Train,
tracked in MLflow: masked language modelling on captions, masked patch modelling on images,
cross-modal contrastive (``pretrain.loss``: {mlm, mpm, itc} weights).

Reads the image-caption pairs (caption = the query column; boxes unused) of
``pretrain.domains`` x ``pretrain.splits`` of a prepared dataset, trains with ``train`` settings
overridden by ``pretrain.train``, checkpoints to ``runtime.storage``, and registers the final
model as a new version of ``pretrain.registered_model``. Start DATE training from it with
``--set model.init_from=models:/date-pretrained/<version>`` (or the folder of ``--out``).

  python pipelines/pretrain.py
  python pipelines/pretrain.py --set pretrain.train.max_steps=500 --set 'pretrain.domains=[mall]' --out runs/models/pre
  ray job submit --working-dir . -- python pipelines/pretrain.py --config my.yaml

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
    parser.add_argument("--out", metavar="DIR", help="also copy the final model folder here (DIR/model)")
    args = parser.parse_args(argv)
    cfg = cli.resolve(args, "pretrain")
    if args.dry_run:
        return 0

    from date_core.data.schema import DataError
    from date_core.runtime import session, tracking
    from date_core.runtime.dataset import ensure_dataset, plan_dataset
    from date_core.runtime.pretraining import pretrain_parts, run_pretrain

    try:
        if plan_dataset(cfg, pretrain_parts(cfg)) == "generate":  # the embedded default's root only
            session.init_ray(cfg)
            ensure_dataset(cfg, "train")
            plan_dataset(cfg, pretrain_parts(cfg))
    except DataError as exc:
        sys.exit(f"pretrain: {exc}")
    session.init_ray(cfg)
    name = session.run_name(cfg, "pretrain")
    experiment_id = tracking.setup(cfg["runtime"]["experiment"])
    print(f"[pretrain] run {name}: {cfg['runtime']['num_workers']} worker(s), gpu={cfg['runtime']['use_gpu']}, "
          f"storage {cfg['runtime']['storage']}", flush=True)
    with tempfile.TemporaryDirectory(prefix=f"date-{name}-") as tmp, cli.stage_errors("pretrain", name):
        result = run_pretrain(cfg, name, experiment_id=experiment_id, out_dir=args.out or tmp)
    registered = cfg["pretrain"]["registered_model"]
    model = str(result.model_dir) if args.out else f"models:/{registered}/{result.version}"
    shown = {k: round(float(v), 4) for k, v in sorted(result.metrics.items())
             if k.startswith("pretrain/") and isinstance(v, (int, float))}
    print(json.dumps({"run": name, "mlflow_run_id": result.run_id, "model": model,
                      "registered_version": result.version, "metrics": shown,
                      "use_it": f"--set model.init_from={model}"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
