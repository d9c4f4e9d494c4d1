#!/usr/bin/env python
"""Evaluate a seeker on one domain/split of a prepared dataset; write the metrics as JSON.

MODEL is a local checkpoint folder or an MLflow model URI (models:/NAME@champion,
models:/NAME/VERSION, runs:/RUN_ID/model; tracking server from MLFLOW_TRACKING_URI, else
runs/mlflow.db). The JSON holds <domain>_<split>/pr/R@1, R@5, R@10, mAP@10 and
<domain>_<split>/pg/mIoU, acc@0.3, acc@0.5, acc@0.7; a metric that is undefined on the split
(e.g. the pg/* ones when no pair has a box) is written as null.

  python pipelines/evaluate.py --model models:/date-seeker@champion --data runs/data/productworld \\
      --domain live --split test --out metrics.json --png predictions.png

--instance: instance-level retrieval (Product1M's task) on an instance-mode dataset
(``prepare.py synth --instance`` / ``voc --instance``): each multi/test query (image + caption)
ranks single/gallery; the JSON holds Product1M's mAP/Prec/mAR@10/50/100, official and textbook
(inst/official/..., inst/textbook/...), and the scoring rule, chosen on multi/val unless
--text-weight and --image-pool are given (see date_core/retrieval/instance.py).

  python pipelines/evaluate.py --instance --model runs/models/seeker/model --data runs/data/pw-instance --out inst.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from date_core import cli  # noqa: F401  (the offline environment, set on import)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder or MLflow URI (models:/..., runs:/...)")
    parser.add_argument("--data", required=True, help="prepared dataset root (local or s3://)")
    parser.add_argument("--domain", help="domain to evaluate, e.g. mall or live (not with --instance)")
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument("--out", required=True, help="where to write the metrics JSON")
    parser.add_argument("--png", help="also save a grid of predictions (true box green, predicted red)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N pairs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--instance", action="store_true", help="instance-level retrieval (multi/test vs single/gallery)")
    parser.add_argument("--text-weight", type=float, help="--instance: caption weight in [0, 1] (default: chosen on multi/val)")
    parser.add_argument("--image-pool", choices=["mean", "tokens"], help="--instance: query image side (default: chosen on multi/val)")
    args = parser.parse_args(argv)
    if args.instance:
        return _instance(args)
    if not args.domain:
        parser.error("--domain is required (or --instance)")

    from date_core.evaluation.metrics import metrics_json
    from date_core.runtime.tracking import evaluate_model

    print(f"[evaluate] {args.model} on {args.data} {args.domain}/{args.split}", flush=True)
    try:
        out = evaluate_model(args.model, args.data, args.domain, args.split, batch_size=args.batch_size,
                             limit=args.limit, device=args.device, png=args.png)
    except (FileNotFoundError, ValueError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    # NaN metrics (e.g. pg/* on a split without boxes) are written as null: strict JSON.
    Path(args.out).write_text(metrics_json(out, indent=2))
    for key, value in out.items():
        if "/pr/" in key or "/pg/" in key:
            print(f"  {key:32s} {value:.4f}")
    print(f"[evaluate] wrote {args.out}", flush=True)
    return 0


def _instance(args: argparse.Namespace) -> int:
    from date_core.data.schema import DataError
    from date_core.retrieval.instance import evaluate_checkpoint
    from date_core.evaluation.metrics import metrics_json
    from date_core.runtime.tracking import local_checkpoint

    print(f"[evaluate] instance retrieval: {args.model} on {args.data} multi/{args.split} vs single/gallery", flush=True)
    try:
        with local_checkpoint(args.model) as model_dir:
            out = evaluate_checkpoint(str(model_dir), args.data, ("multi", args.split), text_weight=args.text_weight,
                                      image_pool=args.image_pool, batch_size=args.batch_size, device=args.device)
    except (FileNotFoundError, ValueError, DataError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    out = {"model": args.model, "data": args.data, **out}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(metrics_json(out, indent=2))
    print(f"  rule: image_pool={out['image_pool']} text_weight={out['text_weight']}")
    for key, value in out.items():
        if key.startswith("inst/") and "@" in key:
            print(f"  {key:32s} {value:.4f}")
    print(f"[evaluate] wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
