#!/usr/bin/env python
"""PG-DA, the main job: adapt product grounding from the annotated source domain (mall) to the
unannotated target domain (live) by domain alignment and pseudo-box self-training.

With no arguments it runs the embedded default on this machine: it prepares a small
ProductWorld dataset at runs/data/productworld if none exists, starts a local Ray, logs to a
local MLflow store (runs/mlflow.db) and runs 2 rounds (round 1: source boxes + target pairs;
round 2: + the pseudo boxes of round 1), printing progress (round, step, ETA) and a results table.
ProductWorld is generated only there, or wherever --set data.synth.generate=true asks for it:
any other data.root without a dataset, domain or split that the job reads stops it before Ray
starts, with one line naming the path and how to prepare it.

  python pipelines/pgda.py
  python pipelines/pgda.py --config my.yaml --set adapt.rounds=3 --set runtime.run_name=pgda-v1
  ray job submit --working-dir . -- python pipelines/pgda.py --config my.yaml \\
      --set data.root=s3://bucket/productworld --set runtime.storage=s3://bucket/runs

Re-running with the same --set runtime.run_name=NAME continues from the last finished round
and checkpoint. Config keys: see date_core/configs/default.yaml (data, model, loss, train,
runtime, adapt).
"""
from __future__ import annotations

import sys

from date_core import cli


def main(argv: list[str] | None = None) -> int:
    parser = cli.config_parser(__doc__)
    args = parser.parse_args(argv)
    cfg = cli.resolve(args, "pgda")
    if args.dry_run:
        return 0
    cli.check_dataset(cfg, "pgda")
    from date_core.runtime import session
    from date_core.runtime.pgda import run_pgda

    session.init_ray(cfg)
    name = session.run_name(cfg, "pgda")
    with cli.stage_errors("pgda", name):
        run_pgda(cfg, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
