#!/usr/bin/env python
"""Sweep PG-DA's adaptation knobs with Ray Tune: every trial runs the PG-DA rounds through the
same code as pipelines/pgda.py (each round a Ray Train run), reports after every round so that
ASHA stops weak trials early, and is an MLflow run under one sweep parent run, its config as
params. The best trial's config is written as a YAML file that pgda.py runs as it is.

  python pipelines/sweep.py --space tune_spaces/alignment.yaml --select-by target_val
  python pipelines/sweep.py --space tune_spaces/ci.yaml --select-by proxy --set runtime.run_name=sw1
  python pipelines/pgda.py --config runs/sweeps/sw1/best.yaml

Model selection (--select-by) is explicit:
  target_val  the labelled target validation split (data.target_domain / data.val_split, at most
              data.max_val_pairs pairs): boxes YOU must supply for a few hundred target pairs
              (ProductWorld's live/val has them). The honest choice when you can label.
  proxy       unsupervised: the seeker's mean pseudo-label reliability on the target validation
              pairs (teacher confidence and agreement between views; boxes unread). Needs no
              labels, but can prefer a confidently wrong seeker; docs/sweeps-and-promotion.md reports how well it
              ranks trials against the labelled metric.
Both are computed and logged every round either way; the summary prints their rank correlation.

The search space file (tune_spaces/*.yaml) sets the distributions, metric, mode, ASHA, search
algorithm, trial resources and max_concurrent_trials; its `config:` keys are set for every trial
(over --config, under --set). Re-running with the same --set runtime.run_name=NAME resumes an
interrupted sweep (Tuner.restore). Tune's and the trials' files go to runtime.storage/NAME/.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from date_core import cli


def main(argv: list[str] | None = None) -> int:
    parser = cli.config_parser(__doc__)
    parser.add_argument("--space", required=True, metavar="tune_spaces/X.yaml", help="search space file")
    parser.add_argument("--select-by", choices=("target_val", "proxy"), default="target_val",
                        help="model selection: labelled target validation split, or the unsupervised proxy")
    parser.add_argument("--num-samples", type=int, metavar="N", help="trials (instead of the space's num_samples)")
    parser.add_argument("--out", metavar="BEST.yaml", help="where to write the best config "
                        "(default: runs/sweeps/<name>/best.yaml)")
    args = parser.parse_args(argv)

    from date_core.config_schema import ConfigError
    from date_core.runtime.space import load_space

    try:
        space = load_space(args.space)
    except ConfigError as exc:
        sys.exit(f"sweep: bad search space: {exc}")
    if args.num_samples is not None:
        if args.num_samples < 1:
            sys.exit("sweep: --num-samples must be at least 1")
        space = dataclasses.replace(space, num_samples=args.num_samples)
    # the space's config keys: over --config, under --set (JSON is YAML, as --set values are read)
    args.overrides = [f"{k}={json.dumps(v)}" for k, v in space.config.items()] + args.overrides
    cfg = cli.resolve(args, "sweep")
    print(f"[sweep] search space {args.space}: " + ", ".join(f"{k} {d}" for k, d in space.params.items()), flush=True)
    if args.dry_run:
        return 0
    cli.check_dataset(cfg, "pgda")
    from date_core.runtime import session
    from date_core.runtime.sweep import SweepError, check_target_labels, run_sweep

    try:
        if args.select_by == "target_val":
            check_target_labels(cfg)
    except SweepError as exc:
        sys.exit(f"sweep: {exc}")
    session.init_ray(cfg)
    name = session.run_name(cfg, "sweep")
    out = Path(args.out or Path("runs") / "sweeps" / name / "best.yaml")
    try:
        run_sweep(cfg, space, name, args.select_by, out)
    except SweepError as exc:
        sys.exit(f"sweep: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
