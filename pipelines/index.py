#!/usr/bin/env python
"""Index a catalogue: embed every image of a prepared dataset with a seeker, as Parquet shards
plus a manifest (OUT/index.json), with a Ray Data actor pool (one model replica per GPU, or per
CPU slot). Re-running skips the shards already written by the same model.

MODEL is a checkpoint folder or an MLflow URI (models:/NAME@champion, models:/NAME/VERSION,
runs:/RUN_ID/model). DATA is a prepared dataset root (pipelines/prepare.py), local or s3://;
by default every <domain>/<split> under it is indexed, or those named with --dataset.

  python pipelines/index.py --model models:/date-seeker@champion --data runs/data/productworld \\
      --dataset mall/test --out runs/index/mall-test
  ray job submit --working-dir . -- python pipelines/index.py --model models:/date-seeker@champion \\
      --data s3://bucket/catalogue --out s3://bucket/index --gpu
"""
from __future__ import annotations

import argparse
import sys

from date_core import cli  # noqa: F401  (the offline environment, set on import)


def parse_dataset(text: str) -> tuple[str, str]:
    domain, sep, split = text.partition("/")
    if not sep or not domain or not split:
        raise argparse.ArgumentTypeError(f"expected DOMAIN/SPLIT (e.g. mall/test), got {text!r}")
    return domain, split


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder or MLflow URI (models:/..., runs:/...)")
    parser.add_argument("--data", required=True, help="prepared dataset root (local or s3://)")
    parser.add_argument("--out", required=True, help="index folder (local or s3://)")
    parser.add_argument("--dataset", action="append", type=parse_dataset, metavar="DOMAIN/SPLIT",
                        help="index only this dataset (repeatable); default: every dataset under --data")
    parser.add_argument("--gpu", action="store_true", help="one replica per GPU (default: one per CPU)")
    parser.add_argument("--replicas", type=int, help="model replicas (default: the cluster's GPUs or CPUs)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    args = parser.parse_args(argv)

    from date_core.runtime import session
    from date_core.runtime.indexer import run_index
    from date_core.runtime.tracking import local_checkpoint

    print(f"[index] {args.model}: {args.data} -> {args.out}", flush=True)
    try:
        with local_checkpoint(args.model) as model_dir:
            session.init_ray()
            run_index(model_dir, args.data, args.out, model_uri=args.model, datasets=args.dataset,
                      replicas=args.replicas, use_gpu=args.gpu, batch_size=args.batch_size,
                      log=lambda line: print(line, flush=True))
    except (FileNotFoundError, ValueError) as exc:
        print(f"index: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
