#!/usr/bin/env python
"""Prepare image-query pairs as the sharded Parquet dataset the trainers stream with Ray Data.

Every sub-command writes, under OUT (a local folder or s3://bucket/prefix):
  OUT/<domain>/<split>/*.parquet   the pairs (data contract: docs in date_core/data/schema.py)
  OUT/rejected/*.parquet           every row that failed validation, with `reason` and `detail`
  OUT/_summary.json                rows read / kept / rejected by reason, per domain and split
  OUT/tokenizer/                   the query tokenizer (WordPiece trained on the train queries,
                                   or a copy of --tokenizer PATH)
No row is dropped silently: a bad row is rejected with its reason; a structural problem
(a missing column, an unreadable file) stops the run with one line naming the file, exit 2.
Splits: a row may name its split; otherwise train/val/test by a hash of image_id (an image
never straddles splits). S3: endpoint, keys and region come only from the standard AWS
environment variables (AWS_ENDPOINT_URL[_S3], AWS_ACCESS_KEY_ID, ..., AWS_REGION).

Examples:
  python pipelines/prepare.py synth --mall 3000 --live 1500 --seed 0 --out runs/data/productworld
  python pipelines/prepare.py synth --mall 474000 --live 101000 --seed 0 --out s3://bucket/productworld
  python pipelines/prepare.py manifest pairs.jsonl --out s3://bucket/shop
  python pipelines/prepare.py voc /data/freiburg_groceries_voc --domain mall --out runs/data/groceries
  python pipelines/prepare.py product1m product1m_train_ossurl_v2.txt --images /data/p1m --out runs/data/p1m
  python pipelines/prepare.py synth --instance --queries 1200 --seed 0 --out runs/data/pw-instance
  python pipelines/prepare.py voc /data/freiburg_groceries_voc --instance --queries 1000 --out runs/data/groceries-instance

Instance mode (--instance of synth and voc; Product1M-like instance-level retrieval) writes
  OUT/multi/{train,val,test}/      multi-product query images, a caption each, instance_ids
  OUT/single/gallery/              the single-product retrieval gallery (instance_ids = [item])
  OUT/single/train/                (synth) single-product image + title pairs of train items

Ray: a local Ray with --num-cpus (default: all cores), or the cluster at RAY_ADDRESS
(`ray job submit -- python pipelines/prepare.py ...`).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from date_core import cli  # noqa: F401  (the offline environment, set on import)

PAPER_SCALE_NOTE = """\
Paper scale (474k mall + 101k live images, ~690k pairs): run
  python pipelines/prepare.py synth --mall 474000 --live 101000 --seed 0 --out OUT
on a Ray cluster or a many-core machine; the time to expect on this hardware is measured by
bench/data_throughput.py (ProductWorld images/s, extrapolated) and recorded in BENCHMARKS.md.
The work is embarrassingly parallel: it scales with the CPUs Ray has."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR_OR_S3",
                   help="output location: a local folder or s3://bucket/prefix")
    p.add_argument("--splits", default="train=0.8,val=0.1,test=0.1", metavar="FRACTIONS",
                   help="split fractions for rows that name no split, assigned by a hash of image_id "
                        "(default: %(default)s)")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="local pretrained tokenizer folder to ship with the dataset, instead of "
                        "training a WordPiece tokenizer on the train queries")
    p.add_argument("--vocab-size", type=int, default=8000,
                   help="WordPiece vocabulary size when training one (default: %(default)s)")
    p.add_argument("--shard-mb", type=float, default=256.0,
                   help="target Parquet file size in MB; small data gives one file per split "
                        "(default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a dataset already at --out (only what a prepare run writes is deleted)")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs of the local Ray (default: all cores; ignored with RAY_ADDRESS)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{synth,manifest,voc,product1m}")

    p = sub.add_parser("synth", help="generate ProductWorld (synthetic mall + live) with Ray Data",
                       description="Generate ProductWorld images in parallel (ray.data.range over image "
                                   "indices -> map_batches -> Parquet). Deterministic per seed.\n\n"
                                   + PAPER_SCALE_NOTE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mall", type=_positive_int, help="number of mall (catalogue) images (required without --instance)")
    p.add_argument("--live", type=_positive_int, help="number of live (stream frame) images (required without --instance)")
    p.add_argument("--instance", action="store_true",
                   help="instance mode (Product1M-like): multi-product query images with marketing captions "
                        "and instance_ids -> OUT/multi/{train,val,test}, a single-product gallery -> "
                        "OUT/single/gallery, single-product title pairs of train items -> OUT/single/train")
    p.add_argument("--queries", type=_positive_int, default=1200,
                   help="instance mode: number of multi-product query images (default: %(default)s)")
    p.add_argument("--items", type=int, default=None,
                   help="instance mode: catalogue items the queries draw from (default: --queries clipped "
                        "to [8, 1200], so each item is in ~3 queries)")
    p.add_argument("--distractors", type=_positive_int, default=None,
                   help="instance mode: gallery items no query shows (default: half of --items)")
    p.add_argument("--single-per-item", type=_positive_int, default=1,
                   help="instance mode: single/train images per item of the train queries (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default: %(default)s)")
    p.add_argument("--world-config", metavar="FILE.yaml",
                   help="ProductWorld knobs per domain (see date_core/data/productworld/config.py)")
    p.add_argument("--images-per-task", type=int, default=32,
                   help="images rendered per Ray task (default: %(default)s)")
    _add_common(p)

    p = sub.add_parser("manifest", help="pairs listed in a JSONL (or Parquet) manifest",
                       description="One JSON object a line: image (local path, relative to the manifest, or "
                                   "s3:// URI), query, box [x1,y1,x2,y2] pixels or null, optional alt_boxes, "
                                   "domain, optional split, item_id, optional pair_id / image_id / width / "
                                   "height. A .parquet manifest has the same columns.")
    p.add_argument("manifest", metavar="FILE", help="manifest: .jsonl or .parquet, local or s3://")
    _add_common(p)

    p = sub.add_parser("voc", help="Pascal VOC folders (one pair per image and class)",
                       description="Pascal VOC: annotations/<sub>/*.xml + images/<sub>/*, or Annotations/ + "
                                   "JPEGImages/. Query: a phrase from the class name ('a pack of coffee'); "
                                   "box: the class's largest box, alt_boxes: its others; item_id: the class.")
    p.add_argument("root", metavar="DIR", help="the VOC dataset folder, local or s3://")
    p.add_argument("--domain", help="domain of every pair (e.g. mall or live; required without --instance)")
    p.add_argument("--query-template", metavar="TEXT",
                   help="query for class {name}, e.g. 'a photo of {name}' (default: built-in phrases)")
    p.add_argument("--instance", action="store_true",
                   help="instance mode: product crops (VOC boxes) of several photos composed into multi-product "
                        "query images -> OUT/multi/{train,val,test} (instance_ids = the classes shown), held-out "
                        "single-product photos -> OUT/single/gallery")
    p.add_argument("--queries", type=_positive_int, default=1000,
                   help="instance mode: number of composed query images (default: %(default)s)")
    p.add_argument("--gallery-per-class", type=_positive_int, default=10,
                   help="instance mode: photos per class held out as the gallery, never cropped into a query "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="instance mode: composition seed (default: %(default)s)")
    _add_common(p)

    p = sub.add_parser("product1m", help="Product1M text files with images already on disk",
                       description="Product1M lines item_id#####title#####url(s)[#####labels joined by #;#]. "
                                   "Images are looked up in --images by the URL's file name (nothing is "
                                   "downloaded); a missing one is a rejected row. No boxes.")
    p.add_argument("file", metavar="FILE", help="a Product1M .txt file, local or s3://")
    p.add_argument("--images", required=True, metavar="DIR", help="folder holding the images, local or s3://")
    p.add_argument("--domain", default="mall", help="domain of every pair (default: %(default)s)")
    _add_common(p)
    return parser


def describe(args: argparse.Namespace) -> str:
    """One paragraph: what this run will do."""
    if args.command == "synth" and args.instance:
        what = (f"generate ProductWorld's instance mode: {args.queries} multi-product queries, their "
                f"single-product gallery and train images, seed {args.seed}")
    elif args.command == "voc" and args.instance:
        what = (f"compose {args.queries} multi-product queries from the VOC crops at {args.root}, "
                f"{args.gallery_per_class} gallery photos per class, seed {args.seed}")
    elif args.command == "synth":
        what = (f"generate ProductWorld: {args.mall} mall + {args.live} live images, seed {args.seed}, "
                f"{args.images_per_task} images per Ray task")
    elif args.command == "manifest":
        what = f"ingest the pairs listed in {args.manifest}"
    elif args.command == "voc":
        what = f"ingest the Pascal VOC dataset at {args.root} as domain {args.domain!r}"
    else:
        what = f"ingest Product1M lines of {args.file} with images from {args.images} as domain {args.domain!r}"
    tok = f"copy tokenizer {args.tokenizer}" if args.tokenizer else f"train a WordPiece tokenizer ({args.vocab_size})"
    return (f"[prepare] will {what};\n[prepare] splits {args.splits} (rows naming no split); "
            f"~{args.shard_mb:g} MB Parquet files; {tok};\n[prepare] write {args.out}/<domain>/<split>/, "
            f"{args.out}/rejected/, {args.out}/tokenizer/, {args.out}/_summary.json")


def run(args: argparse.Namespace) -> dict:
    """Parse and check everything that can fail structurally, then start Ray and do the work."""
    from date_core.data.assemble import assemble
    from date_core.data.outputs import check_output, prepare_output
    from date_core.data.splits import parse_fractions

    fractions = parse_fractions(args.splits)
    check_output(args.out, args.overwrite)
    common = dict(fractions=fractions, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                  shard_mb=args.shard_mb, num_cpus=args.num_cpus,
                  meta={"command": " ".join(["prepare.py", *args.argv])})
    if args.tokenizer:
        from date_core.text import load_tokenizer

        load_tokenizer(args.tokenizer)  # a bad path fails now, not after the whole run
    if args.command == "synth":
        config = None
        if args.world_config:
            from date_core.config import load_yaml
            from date_core.data.productworld import ProductWorldConfig

            config = ProductWorldConfig.from_dict(load_yaml(args.world_config))
        from date_core.runtime import dataio

        if args.instance:
            return dataio.prepare_productworld_instance(
                args.out, args.queries, args.seed, items=args.items, distractors=args.distractors,
                single_per_item=args.single_per_item, config=config, images_per_block=args.images_per_task,
                overwrite=args.overwrite, **common)
        return dataio.prepare_synth(args.out, args.mall, args.live, args.seed, config=config,
                                    images_per_block=args.images_per_task, overwrite=args.overwrite, **common)
    if args.command == "manifest":
        from date_core.data.manifest import iter_manifest

        items = iter_manifest(args.manifest)
    elif args.command == "voc" and args.instance:
        from date_core.data.voc_instance import plan_voc_instances, render_voc_instance_rows
        from date_core.runtime import dataio

        plan = plan_voc_instances(args.root, args.queries, args.seed, fractions=fractions,
                                  gallery_per_class=args.gallery_per_class)
        meta = {**common.pop("meta"), "mode": "voc-instance", "seed": args.seed, "instance": plan.counts(),
                "split_fractions": dict(fractions)}
        common.pop("fractions")
        return dataio.prepare_rendered(args.out, plan.total, render_voc_instance_rows, {"plan": plan},
                                       overwrite=args.overwrite, meta=meta, **common)
    elif args.command == "voc":
        from date_core.data.voc import iter_voc

        items = iter_voc(args.root, args.domain, args.query_template)
    else:
        from date_core.data.product1m import iter_product1m

        items = iter_product1m(args.file, args.images, args.domain)
    from tqdm import tqdm

    asm = assemble(tqdm(items, desc="[prepare] parse", unit=" rows", mininterval=1.0), fractions)
    prepare_output(args.out, args.overwrite)  # only now: a structural error must not cost the old data
    from date_core.runtime import dataio

    return dataio.prepare_records(asm, args.out, **common)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "synth" and not args.instance and (args.mall is None or args.live is None):
        parser.error("synth: --mall and --live are required (or --instance)")
    if args.command == "voc" and not args.instance and not args.domain:
        parser.error("voc: --domain is required (or --instance)")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    print(describe(args), flush=True)
    from date_core.data.schema import DataError
    from date_core.data.summary import format_table

    start = time.time()
    try:
        summary = run(args)
    except DataError as exc:
        print(f"prepare: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        # Unreadable/unwritable storage or a bad option value: one line, no traceback.
        print(f"prepare: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    elapsed = time.time() - start
    print(format_table(summary), flush=True)
    print(f"[prepare] {summary['read']} rows read, {summary['kept']} kept, {summary['rejected']} rejected "
          f"in {elapsed:.1f}s ({summary['read'] / max(elapsed, 1e-9):.1f} rows/s); summary at "
          f"{args.out.rstrip('/')}/_summary.json", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    sys.exit(main())
