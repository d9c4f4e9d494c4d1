#!/usr/bin/env python
"""Promote a model version through the MLflow registry: alias `challenger` on it, evaluate it and
the current `champion` on the same labelled data (pipelines/evaluate.py's evaluation), and move
`champion` only when the challenger wins the primary metric by at least the margin and loses no
guard metric by more than the tolerance. The decision and both metric sets are recorded on the
version (tags `date.promotion.*` and its description). Aliases only, never stages.

  python pipelines/promote.py --version 7                      # a registered version
  python pipelines/promote.py --run 3f2a...                    # a run's model (registered if needed)
  python pipelines/promote.py --version 7 --margin 0.01 --guard pr/R@1 --tolerance 0.02 --split test
  python pipelines/promote.py --rollback                       # champion back to the one it replaced

Defaults come from the config (`promote:` section, `data.root`, `runtime.registered_model`);
flags override them (they are `--set promote.<key>=...`). Evaluation data: `data.root`,
domain `promote.domain` (default `data.target_domain`), split `promote.split`: a split whose
pairs carry boxes. Tracking server: MLFLOW_TRACKING_URI, else runs/mlflow.db.

Two promotions may run at once: moving `champion` is a compare-and-set on the champion version
under a registry lock, and a challenger whose champion moved meanwhile is compared again.

Exit status: 0 promoted (or rolled back), 3 refused by the gate, 2 refused because something is
missing (model, version, run, alias, evaluation data) or the config is bad.
"""
from __future__ import annotations

import sys

from date_core import cli

REFUSED, MISSING = 3, 2


def main(argv: list[str] | None = None) -> int:
    parser = cli.config_parser(__doc__)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", help="registered version to promote")
    which.add_argument("--run", metavar="RUN_ID", help="MLflow run whose logged model to promote (registered if needed)")
    which.add_argument("--rollback", action="store_true", help="point champion back at the version it replaced")
    parser.add_argument("--model", help="registered model name (default: runtime.registered_model)")
    parser.add_argument("--data", help="prepared dataset root (default: data.root)")
    parser.add_argument("--domain", help="evaluation domain (default: promote.domain, else data.target_domain)")
    parser.add_argument("--split", help="evaluation split, labelled (default: promote.split)")
    parser.add_argument("--metric", help="primary metric, e.g. pg/acc@0.5 (default: promote.metric)")
    parser.add_argument("--margin", type=float, help="the challenger must win the metric by at least this")
    parser.add_argument("--guard", action="append", help="guard metric (repeatable; replaces promote.guards)")
    parser.add_argument("--tolerance", type=float, help="largest allowed loss on a guard metric")
    parser.add_argument("--limit", type=int, help="evaluate only the first N pairs")
    parser.add_argument("--device", default="cpu", help="torch device of the evaluation")
    args = parser.parse_args(argv)
    # the flags are config overrides, so they are checked by the same schema as --set
    flags = {"data.root": args.data, "runtime.registered_model": args.model, "promote.domain": args.domain,
             "promote.split": args.split, "promote.metric": args.metric, "promote.margin": args.margin,
             "promote.guards": args.guard, "promote.tolerance": args.tolerance, "promote.limit": args.limit}
    args.overrides += [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in flags.items() if v is not None]
    cfg = cli.resolve(args, "promote")
    if args.dry_run:
        return 0

    from date_core.data import io, storage
    from date_core.runtime import promotion, tracking

    name, p = cfg["runtime"]["registered_model"], cfg["promote"]
    tracking.setup(cfg["runtime"]["experiment"])
    client = tracking._client()
    try:
        if args.rollback:
            demoted, restored = promotion.rollback(client, name)
            print(f"[promote] rolled back: {name} champion {demoted} -> {restored}", flush=True)
            return 0
        root, domain, split = cfg["data"]["root"], p["domain"] or cfg["data"]["target_domain"], p["split"]
        if not storage.exists(io.pairs_uri(root, domain, split)):
            raise promotion.PromotionError(f"no evaluation data at {io.pairs_uri(root, domain, split)}")
        version = promotion.resolve_version(client, name, version=args.version, run_id=args.run)
        tag = f"{domain}_{split}"

        def evaluate(uri: str) -> dict:
            print(f"[promote] evaluating {uri} on {root} {domain}/{split}", flush=True)
            return tracking.evaluate_model(uri, root, domain, split, limit=p["limit"], device=args.device)

        decision = promotion.promote(client, name, version, promotion.Gate.from_config(p), evaluate, tag,
                                     f"{root} {domain}/{split}")
    except (promotion.PromotionError, FileNotFoundError) as exc:
        print(f"promote: refused: {exc}", file=sys.stderr)
        return MISSING
    print(f"[promote] {name} version {decision.challenger} vs champion {decision.champion or '(none)'}: "
          f"{decision.word}", flush=True)
    for reason in decision.reasons:
        print(f"  {reason}", flush=True)
    champion = promotion.alias_version(client, name, promotion.CHAMPION)
    print(f"[promote] {name}@champion = version {champion}", flush=True)
    return 0 if decision.promote else REFUSED


if __name__ == "__main__":
    sys.exit(main())
