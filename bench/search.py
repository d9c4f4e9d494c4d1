"""Catalogue search at the paper's scale: top-10 for 1,000 queries over 575,000 gallery embeddings.

Compares, in one run, each in its own process (so that peak memory is each method's own):

  numpy      plain brute force: the whole score matrix, argpartition, sort of the k (baseline)
  exact      date_core.retrieval.search.exact_search: score blocks of bounded size, top-k merged per block
  hnsw, ivf  date_core.retrieval.search.ApproxIndex (FAISS) at its default effort, recall@10 vs exact

on two galleries of unit vectors (dimension 256, the `lite` preset's):

  random     uniform on the sphere: fine for timing exact search, the worst case for an
             approximate index (no neighbourhood structure at all)
  clustered  products (4 images each) on a 24-dimensional subspace with image noise, and queries
             near a random product: a stand-in for real embeddings, whose neighbourhoods have
             low intrinsic dimension. The recall goal is read on this one.

Fair baseline: where OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are set (they slow a current numpy
on some processors), both are unset in the numpy process only; every process records its BLAS
kernel (threadpoolctl). Queries/s is for the 1,000-query batch; latency p50/p99 for queries
one at a time. Optionally (--index-model) also the index build throughput: pipelines/index.py's
Ray Data actor pool against a plain PyTorch loop over the same images.

    python bench/search.py                       # the full run (about 10 minutes on 2 CPUs)
    python bench/search.py --gallery 100000      # smaller
    python bench/search.py --index-model runs/models/lite-pw --index-data runs/data/productworld

Writes bench/results/search.json: {"cpu": {"numpy_qps", "exact_qps", "ann_qps", "ann_recall@10",
...}, "galleries": {...}, "index_build": {...}}.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import hardware, markdown_table, write_result


ROOT = Path(__file__).resolve().parents[1]
BLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
METHODS = ("numpy", "exact", "hnsw", "ivf")


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_gallery(kind: str, n: int, n_queries: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(queries ``[Q, D]``, gallery ``[G, D]``) float32 unit rows, seeded."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        return (unit(rng.standard_normal((n_queries, dim), dtype=np.float32)),
                unit(rng.standard_normal((n, dim), dtype=np.float32)))
    products = n // 4
    centres = unit(rng.standard_normal((products, 24), dtype=np.float32) @ rng.standard_normal((24, dim), dtype=np.float32))
    gallery = np.repeat(centres, 4, axis=0)
    gallery = unit(gallery + 0.6 * unit(rng.standard_normal(gallery.shape, dtype=np.float32)))
    queries = unit(centres[rng.integers(0, products, n_queries)]
                   + 0.9 * unit(rng.standard_normal((n_queries, dim), dtype=np.float32)))
    return queries, gallery


def _rss_mib() -> float:
    """This process's peak resident memory (VmHWM) in MiB."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    """Reset the peak to the current resident size (Linux: write 5 to /proc/self/clear_refs), so
    the peak measured afterwards is the method's own, not the imports' or the loading's."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        pass


def worker(method: str, folder: Path, k: int, threads: int, latency_queries: int) -> dict:
    """One method in this process: load the arrays, (build,) search, time, save the ids."""
    import threadpoolctl

    queries = np.load(folder / "queries.npy")
    gallery = np.load(folder / "gallery.npy")
    import torch  # noqa: F401  (imported before the peak is reset, by every method alike)

    _reset_peak()
    base_rss = _rss_mib()
    out: dict = {"method": method, "load_avg_start": os.getloadavg()[0]}
    if method == "numpy":
        from date_core.retrieval.search import brute_force as run

        def run_batch(q):
            return run(q, gallery, k)
    else:
        torch.set_num_threads(threads)
        if method == "exact":
            from date_core.retrieval.search import exact_search

            def run_batch(q):
                return exact_search(q, gallery, k, device="cpu")
        else:
            from date_core.retrieval.search import ApproxIndex

            start = time.perf_counter()
            index = ApproxIndex.build(gallery, method, threads=threads)
            out["build_s"] = time.perf_counter() - start
            out["effort"] = index.effort

            def run_batch(q):
                return index.search(q, k)
    run_batch(queries[:8])  # warm-up (thread pools, first-touch)
    start = time.perf_counter()
    scores, ids = run_batch(queries)
    out["batch_s"] = time.perf_counter() - start
    out["qps"] = len(queries) / out["batch_s"]
    lat = []
    for q in queries[:latency_queries]:
        t = time.perf_counter()
        run_batch(q[None])
        lat.append((time.perf_counter() - t) * 1000)
    out["latency_ms_p50"] = float(np.percentile(lat, 50))
    out["latency_ms_p99"] = float(np.percentile(lat, 99))
    out["peak_rss_mib"] = _rss_mib()
    out["peak_extra_mib"] = out["peak_rss_mib"] - base_rss
    out["blas"] = [{key: info.get(key) for key in ("internal_api", "version", "architecture", "num_threads")}
                   for info in threadpoolctl.threadpool_info() if info.get("user_api") == "blas"]
    out["env"] = {v: os.environ.get(v) for v in BLAS_VARS}
    out["load_avg_end"] = os.getloadavg()[0]  # other jobs on the machine: read the ratios with it
    np.save(folder / f"{method}_ids.npy", ids)
    np.save(folder / f"{method}_scores.npy", scores)
    return out


def run_method(method: str, folder: Path, args) -> dict:
    env = dict(os.environ)
    if method == "numpy":  # the baseline's own process only
        for var in BLAS_VARS:
            env.pop(var, None)
    cmd = [sys.executable, __file__, "--worker", method, "--folder", str(folder), "--k", str(args.k),
           "--threads", str(args.threads), "--latency-queries", str(args.latency_queries)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_gallery(kind: str, args) -> dict:
    from date_core.retrieval.search import recall_at_k, same_results

    with tempfile.TemporaryDirectory(prefix="date-bench-search-") as tmp:
        folder = Path(tmp)
        queries, gallery = make_gallery(kind, args.gallery, args.queries, args.dim, args.seed)
        np.save(folder / "queries.npy", queries)
        np.save(folder / "gallery.npy", gallery)
        del queries, gallery
        methods = [m for m in METHODS if m in args.methods]
        rows = {}
        for method in methods:
            print(f"[search] {kind}: {method} ...", flush=True)
            rows[method] = run_method(method, folder, args)
        ids = {m: np.load(folder / f"{m}_ids.npy") for m in methods}
        scores = {m: np.load(folder / f"{m}_scores.npy") for m in methods}
    ref = "exact" if "exact" in ids else "numpy"
    if "numpy" in ids and "exact" in ids:
        same = same_results(ids["exact"], scores["exact"], ids["numpy"], scores["numpy"])
        rows["exact"]["identical_to_numpy"] = float(same.mean())
        rows["exact"]["same_ids_same_order"] = float((ids["exact"] == ids["numpy"]).all(axis=1).mean())
    for method in ("hnsw", "ivf"):
        if method in ids:
            rows[method]["recall@10"] = recall_at_k(ids[method], ids[ref])
    if "numpy" in rows:
        for row in rows.values():
            row["x_numpy"] = row["qps"] / rows["numpy"]["qps"]
    return rows


def index_build(args) -> dict:
    """pipelines/index.py's images/s against a plain single-process PyTorch loop, same images."""
    from date_core.retrieval.indexing import embed_source, model_fingerprint, source_files
    from date_core.inference import load_seeker

    import torch

    datasets = [tuple(d.split("/")) for d in args.index_dataset]
    sources = source_files(args.index_data, datasets)
    torch.set_num_threads(args.threads)
    seeker = load_seeker(args.index_model, batch_size=64)
    fingerprint = model_fingerprint(args.index_model)
    start = time.perf_counter()
    images = sum(embed_source(seeker, args.index_data, s, fingerprint).num_rows for s in sources)
    plain_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="date-bench-index-") as out:
        cmd = [sys.executable, str(ROOT / "pipelines" / "index.py"), "--model", args.index_model,
               "--data", args.index_data, "--out", out]
        for d in args.index_dataset:
            cmd += ["--dataset", d]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        ray_s = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        progress = [line for line in proc.stdout.splitlines() if "images/s" in line]
    reported = float(progress[-1].split("images/s")[0].split()[-1]) if progress else None
    return {"images": images, "plain_loop_images_per_s": images / plain_s,
            "index_py_images_per_s_embedding": reported, "index_py_images_per_s_end_to_end": images / ray_s,
            "index_py_wall_s": ray_s, "note": "end to end includes Ray start-up and model shipping"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gallery", type=int, default=575_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--latency-queries", type=int, default=100, help="single-query calls timed per method")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--galleries", nargs="+", default=["clustered", "random"], choices=["clustered", "random"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--index-model", help="a checkpoint folder: also measure the index build throughput")
    ap.add_argument("--index-data", default=str(ROOT / "runs" / "data" / "productworld"))
    ap.add_argument("--index-dataset", action="append", default=None, metavar="DOMAIN/SPLIT")
    ap.add_argument("--only-index-build", action="store_true",
                    help="measure only the index build (needs --index-model) and add it to search.json")
    ap.add_argument("--results-dir", help="where to write search.json (default bench/results)")
    ap.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.folder), args.k, args.threads, args.latency_queries)))
        return 0
    if args.only_index_build:  # add the index build figures to the recorded search.json
        path = Path(args.results_dir or ROOT / "bench" / "results") / "search.json"
        result = json.loads(path.read_text()) if path.is_file() else {}
        args.index_dataset = args.index_dataset or ["mall/test"]
        result["index_build"] = {**index_build(args), "load_avg_end": os.getloadavg()[0]}
        result.pop("date", None), result.pop("hardware", None), result.pop("commit", None)
        print(json.dumps(result["index_build"], indent=2))
        print(f"[search] wrote {write_result('search', result, args.results_dir)}")
        return 0
    galleries = {kind: bench_gallery(kind, args) for kind in args.galleries}
    main_kind = "clustered" if "clustered" in galleries else args.galleries[0]
    g = galleries[main_kind]
    cpu = {"gallery": args.gallery, "queries": args.queries, "dim": args.dim, "k": args.k,
           "recall_gallery": main_kind}
    if "numpy" in g:
        cpu["numpy_qps"] = g["numpy"]["qps"]
    if "exact" in g:
        cpu["exact_qps"] = g["exact"]["qps"]
        cpu["exact_identical_to_numpy"] = g["exact"].get("identical_to_numpy")
    if "hnsw" in g:
        cpu.update({"ann": "faiss HNSW", "ann_qps": g["hnsw"]["qps"], "ann_recall@10": g["hnsw"]["recall@10"]})
    result = {"cpu": cpu, "galleries": galleries, "gpu": None,
              "args": {k: v for k, v in vars(args).items() if k not in ("worker", "folder")}}
    if args.index_model:
        args.index_dataset = args.index_dataset or ["mall/test"]
        result["index_build"] = index_build(args)
    path = write_result("search", result, args.results_dir)
    for kind, rows in galleries.items():
        print(f"\n{kind} gallery ({args.gallery:,} x {args.dim}, {args.queries} queries, top-{args.k}):")
        print(markdown_table([{"method": m, **{c: r.get(c) for c in (
            "qps", "x_numpy", "latency_ms_p50", "latency_ms_p99", "peak_extra_mib", "build_s", "recall@10",
            "identical_to_numpy", "load_avg_start", "load_avg_end")}} for m, r in rows.items()]))
    print(f"\n[search] {hardware()['usable_cpus']} CPUs; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
