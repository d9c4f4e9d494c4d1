"""Does re-ranking by grounding confidence help retrieval? (DATE's cooperative seekers)

For each benchmark, a trained seeker indexes the evaluation images with the index pipeline's
own embedding function (``date_core.retrieval.indexing.embed_source``, no Ray needed), every pair of the
evaluation split is a query, each query's top-``candidates`` are retrieved and grounded once
(``date_core.retrieval.seek.rerank_recall``), and each re-ranking weight re-orders them:
score = similarity + weight x grounding confidence; weight 0 is retrieval alone.

    python bench/rerank.py \\
        --bench productworld runs/models/lite-pw runs/data/pw-eval mall/test \\
        --bench freiburg runs/models/lite-grocery bench/_work/groceries grocery/val,grocery/test

Reports R@1 and R@5 per weight with the standard error, and the paired difference of R@1 to
weight 0 with its standard error (the same queries and candidates under both). Writes
``bench/results/rerank.json`` (benchmarks not named in this run are kept from the file).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from _common import markdown_table, write_result


ROOT = Path(__file__).resolve().parents[1]

def run_bench(name: str, model: str, data: str, datasets: list[tuple[str, str]], weights: list[float],
              candidates: int, threads: int) -> dict:
    import pyarrow as pa
    import torch

    from date_core.data.io import read_table
    from date_core.retrieval.indexing import embed_source, index_from_table, model_fingerprint, source_files
    from date_core.inference import load_seeker
    from date_core.retrieval.seek import rerank_recall

    torch.set_num_threads(threads)
    seeker = load_seeker(model, batch_size=64)
    fingerprint = model_fingerprint(model)
    start = time.perf_counter()
    shards = [embed_source(seeker, data, s, fingerprint) for s in source_files(data, datasets)]
    index = index_from_table(pa.concat_tables(shards), {"data": data})
    pairs = pa.concat_tables([read_table(data, d, s, ["query", "item_id"]) for d, s in datasets])
    queries, items = pairs.column("query").to_pylist(), pairs.column("item_id").to_pylist()
    print(f"[rerank] {name}: {len(index)} images, {len(queries)} queries, {candidates} candidates each", flush=True)
    per_query = rerank_recall(seeker, index, queries, items, weights, candidates=candidates, per_query=True)
    rows = []
    base = per_query[0.0]["hits@1"] if 0.0 in per_query else None
    for w, r in per_query.items():
        n = len(r["hits@1"])
        row = {"weight": w, "R@1": float(np.mean(r["hits@1"])), "R@1 se": float(np.std(r["hits@1"]) / np.sqrt(n)),
               "R@5": float(np.mean(r["hits@5"])), "R@5 se": float(np.std(r["hits@5"]) / np.sqrt(n))}
        if base is not None:
            diff = np.asarray(r["hits@1"], float) - np.asarray(base, float)
            row["R@1 - R@1(w=0)"] = float(diff.mean())
            row["paired se"] = float(diff.std() / np.sqrt(n))
        rows.append(row)
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": model, "data": data, "datasets": ["/".join(d) for d in datasets], "images": len(index),
            "queries": len(queries), "candidates": candidates, "seconds": time.perf_counter() - start, "rows": rows}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", nargs=4, action="append", required=True, metavar=("NAME", "MODEL", "DATA", "DATASETS"),
                    help="a benchmark: name, checkpoint folder, dataset root, DOMAIN/SPLIT[,DOMAIN/SPLIT...]")
    ap.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0, 2.0])
    ap.add_argument("--candidates", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results-dir")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    weights = sorted(set([0.0, *args.weights]))
    benches = {}
    for name, model, data, datasets in args.bench:
        pairs = [tuple(d.split("/")) for d in datasets.split(",")]
        benches[name] = run_bench(name, model, data, pairs, weights, args.candidates, args.threads)
    # benchmarks not run now are kept from the previous file (each entry has its own date)
    old = Path(args.results_dir or ROOT / "bench" / "results") / "rerank.json"
    kept = json.loads(old.read_text())["benchmarks"] if old.is_file() else {}
    path = write_result("rerank", {"benchmarks": {**kept, **benches}, "weights": weights,
                                   "candidates": args.candidates}, args.results_dir)
    for name, b in benches.items():
        print(f"\n{name}: {b['images']} images, {b['queries']} queries ({', '.join(b['datasets'])})")
        print(markdown_table(b["rows"]))
    print(f"\n[rerank] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
