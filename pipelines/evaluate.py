#!/usr/bin/env python
"""Evaluate a seeker on one domain/split of a prepared dataset; write the metrics as JSON.

MODEL is a local checkpoint folder or an MLflow model URI (models:/NAME@champion,
models:/NAME/VERSION, runs:/RUN_ID/model; tracking server from MLFLOW_TRACKING_URI, else
runs/mlflow.db). The JSON holds <domain>_<split>/pr/R@1, R@5, R@10, mAP@10 and
<domain>_<split>/pg/mIoU, acc@0.3, acc@0.5, acc@0.7; a metric that is undefined on the split
(e.g. the pg/* ones when no pair has a box) is written as null.

  python pipelines/evaluate.py --model models:/date-seeker@champion --data runs/data/productworld \\
      --domain live --split test --out metrics.json --png predictions.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import _cli  # noqa: F401  (path and offline environment)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder or MLflow URI (models:/..., runs:/...)")
    parser.add_argument("--data", required=True, help="prepared dataset root (local or s3://)")
    parser.add_argument("--domain", required=True, help="domain to evaluate, e.g. mall or live")
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument("--out", required=True, help="where to write the metrics JSON")
    parser.add_argument("--png", help="also save a grid of predictions (true box green, predicted red)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N pairs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    args = parser.parse_args(argv)

    from date_core.metrics import metrics_json
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


if __name__ == "__main__":
    sys.exit(main())
