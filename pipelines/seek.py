#!/usr/bin/env python
"""Seek products by text: search an index built by pipelines/index.py, ground the product in each
hit, print the top-k with scores and boxes, and write a contact sheet (PNG + self-contained HTML).

  python pipelines/seek.py --model models:/date-seeker@champion --index runs/index/mall-test \\
      "red striped mug" "a pack of coffee" --k 5 --out runs/seek

MODEL must be the model the index was built with (its weights' fingerprint is checked).
Search is exact unless --approximate (FAISS HNSW, built when the index is loaded). With
--rerank-weight W > 0, --candidates images per query are grounded and re-ranked by
similarity + W x grounding confidence (off by default; BENCHMARKS.md has the measured gain).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from date_core import cli  # noqa: F401  (the offline environment, set on import)


def main(argv: list[str] | None = None) -> int:
    from date_core.retrieval.seek import DEFAULT_RERANK_WEIGHT

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("queries", nargs="+", metavar="QUERY", help="product descriptions to seek")
    parser.add_argument("--model", required=True, help="checkpoint folder or MLflow URI (models:/..., runs:/...)")
    parser.add_argument("--index", required=True, help="index folder written by pipelines/index.py (local or s3://)")
    parser.add_argument("--k", type=int, default=5, help="hits per query (default 5)")
    parser.add_argument("--approximate", action="store_true", help="approximate search (FAISS HNSW) instead of exact")
    parser.add_argument("--rerank-weight", type=float, default=DEFAULT_RERANK_WEIGHT,
                        help=f"re-rank by similarity + W x grounding confidence (default {DEFAULT_RERANK_WEIGHT})")
    parser.add_argument("--candidates", type=int, help="images per query to ground and re-rank (default k)")
    parser.add_argument("--data", help="where the indexed images are read from (default: the index's dataset)")
    parser.add_argument("--out", default="runs/seek", help="folder for contact_sheet.png/.html and hits.json")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    args = parser.parse_args(argv)

    from date_core.retrieval.contact_sheet import write_html, write_png
    from date_core.retrieval.indexing import load_index, model_fingerprint
    from date_core.inference import load_seeker
    from date_core.runtime.tracking import local_checkpoint
    from date_core.retrieval.seek import seek

    try:
        index = load_index(args.index)
        with local_checkpoint(args.model) as model_dir:
            if model_fingerprint(model_dir) != index.manifest["model_fingerprint"]:
                raise ValueError(f"{args.model} is not the model that built {args.index} "
                                 f"({index.manifest['model']}): re-index with pipelines/index.py")
            seeker = load_seeker(model_dir, device=args.device)
        print(f"[seek] {len(index):,} images in {args.index} ({'approximate' if args.approximate else 'exact'} search)",
              flush=True)
        results = seek(seeker, index, args.queries, args.k, data=args.data, approximate=args.approximate,
                       rerank_weight=args.rerank_weight, candidates=args.candidates)
    except (FileNotFoundError, ValueError) as exc:
        print(f"seek: {exc}", file=sys.stderr)
        return 2
    for query, hits in zip(args.queries, results):
        print(f"\n{query!r}")
        print(f"  {'rank':>4}  {'score':>7}  {'sim':>6}  {'conf':>5}  {'image_id':24s} {'item_id':14s} box (x1, y1, x2, y2)")
        for h in hits:
            box = ", ".join(f"{v:.0f}" for v in h.box)
            print(f"  {h.rank:>4}  {h.score:7.3f}  {h.similarity:6.3f}  {h.confidence:5.2f}  "
                  f"{h.image_id[:24]:24s} {h.item_id[:14]:14s} [{box}]")
    out = Path(args.out)
    png = write_png(args.queries, results, out / "contact_sheet.png")
    page = write_html(args.queries, results, out / "contact_sheet.html", title=f"DATE seek: {args.index}")
    (out / "hits.json").write_text(json.dumps({q: [h.as_dict() for h in hits] for q, hits in
                                               zip(args.queries, results)}, indent=2))
    print(f"\n[seek] wrote {png}, {page} and {out / 'hits.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
