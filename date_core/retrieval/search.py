"""Top-k search over a gallery of L2-normalised embeddings: exact, and approximate (FAISS).

- :func:`exact_search`: chunked matrix products with bounded memory; the scores are computed
  in float32 on a CPU and in bfloat16/float16 on a GPU (``dtype``), and each chunk keeps only its
  own top-k, merged into the running top-k. Same ids, same order as brute force (up to ties).
- :class:`ApproxIndex`: FAISS HNSW (default) or IVF for galleries where exact search is too
  slow. One knob (``effort``) trades recall for speed at query time; measure it with
  :func:`recall_at_k` against :func:`exact_search`.

Why FAISS (``faiss-cpu``) rather than usearch: it is the reference library for this problem
(Meta, maintained since 2017, wheels for every platform we run on) and one dependency covers
both index families we need: HNSW, the best recall per query-second on CPUs, and IVF, which
trains in seconds, runs on GPUs (``faiss-gpu``) and compresses (IVF-PQ) when a gallery
outgrows memory. usearch is a fine HNSW library, but HNSW is all it offers.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

#: Default memory bound of one score block (queries x gallery rows x bytes per score).
DEFAULT_BLOCK_BYTES = 256 * 1024 * 1024
#: Default search effort per approximate index kind (efSearch, nprobe): measured in
#: ``bench/search.py`` to give recall@10 >= 0.95 on its clustered 575k gallery.
DEFAULT_EFFORT = {"hnsw": 48, "ivf": 128}


def _as_tensor(x, device: torch.device, dtype: torch.dtype) -> Tensor:
    if isinstance(x, np.ndarray):
        x = np.ascontiguousarray(x)
        with warnings.catch_warnings():  # a read-only array (e.g. memory-mapped) is only ever read
            warnings.simplefilter("ignore", UserWarning)
            x = torch.from_numpy(x)
    return torch.as_tensor(x).to(device=device, dtype=dtype)


def exact_search(queries, gallery, k: int = 10, *, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, block_bytes: int = DEFAULT_BLOCK_BYTES
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product (cosine for unit vectors).

    ``queries [Q, D]``, ``gallery [G, D]`` (numpy or torch; float32 on the host) -> (float32
    ``[Q, k']`` scores, int64 ``[Q, k']`` gallery rows), best first, ``k' = min(k, G)``.

    The score matrix is never materialised: queries go in blocks and the gallery in chunks so
    that one block of scores stays under ``block_bytes``; each chunk's top-k is merged into the
    block's running top-k. ``device`` defaults to CUDA when available; ``dtype`` to float32 on a
    CPU and bfloat16 on a GPU (tensor cores; the final top-k scores are float32 either way).
    """
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    if dev.type == "cpu" and dt != torch.float32:
        raise ValueError("exact_search on a CPU computes in float32 (half precision is slower there)")
    q_host, g_host = np.asarray(queries) if not isinstance(queries, Tensor) else queries, gallery
    n_q, dim = q_host.shape
    n_g = gallery.shape[0]
    if gallery.ndim != 2 or gallery.shape[1] != dim:
        raise ValueError(f"queries [Q, D] and gallery [G, D] expected, got {tuple(q_host.shape)} and "
                         f"{tuple(gallery.shape)}")
    if k < 1:
        raise ValueError("k must be >= 1")
    k = min(k, n_g)
    elem = torch.finfo(dt).bits // 8
    # a block of queries x a chunk of the gallery; queries small enough that a chunk is >= 4k rows
    q_block = max(1, min(n_q, block_bytes // (elem * max(4 * k, min(n_g, 16384)))))
    g_chunk = max(k, min(n_g, block_bytes // (elem * q_block)))
    out_s = np.empty((n_q, k), np.float32)
    out_i = np.empty((n_q, k), np.int64)
    # on a GPU the gallery is uploaded once (in the compute dtype); on a CPU chunks are views
    g_dev = _as_tensor(g_host, dev, dt) if dev.type == "cuda" else None
    with torch.inference_mode():
        for qs in range(0, n_q, q_block):
            q = _as_tensor(q_host[qs:qs + q_block], dev, dt)
            best_s = torch.full((q.shape[0], 0), -math.inf, device=dev)
            best_i = torch.empty((q.shape[0], 0), dtype=torch.long, device=dev)
            for gs in range(0, n_g, g_chunk):
                g = g_dev[gs:gs + g_chunk] if g_dev is not None else _as_tensor(g_host[gs:gs + g_chunk], dev, dt)
                sims = q @ g.t()
                s, i = sims.topk(min(k, sims.shape[1]), dim=1)
                # merge: the running top-k first, so that among equal scores the lower row wins
                cat_s = torch.cat([best_s, s.float()], 1)
                cat_i = torch.cat([best_i, i + gs], 1)
                best_s, pos = cat_s.topk(min(k, cat_s.shape[1]), dim=1)
                best_i = cat_i.gather(1, pos)
            out_s[qs:qs + q.shape[0]] = best_s.cpu().numpy()
            out_i[qs:qs + q.shape[0]] = best_i.cpu().numpy()
    return out_s, out_i


def brute_force(queries: np.ndarray, gallery: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Plain numpy reference: the whole score matrix, ``argpartition``, then a sort of the k.
    ``[Q, D]``, ``[G, D]`` -> (``[Q, k]`` scores, ``[Q, k]`` rows). Memory ``O(Q * G)``."""
    scores = queries @ gallery.T
    k = min(k, gallery.shape[0])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    part_s = np.take_along_axis(scores, part, 1)
    order = np.argsort(-part_s, axis=1, kind="stable")
    return np.take_along_axis(part_s, order, 1), np.take_along_axis(part, order, 1)


def same_results(ids_a: np.ndarray, scores_a: np.ndarray, ids_b: np.ndarray, scores_b: np.ndarray,
                 tol: float = 1e-5) -> np.ndarray:
    """Per query: do two top-k lists agree up to ties? ``[Q, k]`` each -> bool ``[Q]``.

    Agree = the same scores (within ``tol``) at every rank, and the same ids wherever the score
    at that rank is not tied (within ``tol``) with a neighbour or with the k-th score (a row
    tied with the last one may be swapped for another gallery row of that score).
    """
    same_s = np.abs(scores_a - scores_b) <= tol
    s = scores_a
    tied = np.zeros_like(same_s)
    tied[:, 1:] |= np.abs(s[:, 1:] - s[:, :-1]) <= tol
    tied[:, :-1] |= np.abs(s[:, 1:] - s[:, :-1]) <= tol
    tied |= np.abs(s - s[:, -1:]) <= tol
    return (same_s & ((ids_a == ids_b) | tied)).all(axis=1)


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean share of each query's exact top-k that the approximate top-k found. ``[Q, k]`` each."""
    k = exact_ids.shape[1]
    hits = [len(set(a[:k].tolist()) & set(e.tolist())) for a, e in zip(approx_ids, exact_ids)]
    return float(np.mean(hits) / k) if hits else float("nan")


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise ImportError("approximate search needs faiss-cpu: pip install faiss-cpu") from exc
    return faiss


def default_nlist(n: int) -> int:
    """Inverted lists for ``n`` vectors: at most 4 sqrt(n) (FAISS's guideline), a power of two,
    with at least 39 training points per list (FAISS warns below that)."""
    if n < 78:
        return 1
    return int(min(2 ** int(math.log2(4 * math.sqrt(n))), 2 ** int(math.log2(n // 39))))


class ApproxIndex:
    """An approximate index over unit vectors, inner product, with FAISS.

    ``kind="hnsw"`` (default): a navigable small-world graph (``IndexHNSWFlat``, ``m`` links per
    vector). Slower to build (about 2 minutes for 575k x 256 on 2 CPUs), but the best recall per
    query-second on CPUs; the search knob is ``effort`` = ``efSearch`` (candidates kept while
    walking the graph, at least k).

    ``kind="ivf"``: an inverted file (``IndexIVFFlat``): k-means into ``nlist`` lists (seconds to
    build), and a query scans the ``effort`` = ``nprobe`` nearest lists exactly; it is the family
    that also runs on GPUs and compresses (IVF-PQ) when a gallery outgrows memory.

    Both return exact inner products for the vectors they visit; recall grows with ``effort``.
    """

    def __init__(self, index, kind: str, effort: int) -> None:
        self.index = index
        self.kind = kind
        self.effort = int(effort)

    @classmethod
    def build(cls, gallery: np.ndarray, kind: str = "hnsw", *, effort: int | None = None, m: int = 32,
              ef_construction: int = 64, nlist: int | None = None, train_size: int | None = None,
              seed: int = 0, threads: int | None = None) -> "ApproxIndex":
        """Index ``gallery [G, D]`` (float32 unit rows). IVF trains on at most ``train_size``
        (default 64 per list) random rows, then files all of them."""
        faiss = _faiss()
        if threads:
            faiss.omp_set_num_threads(int(threads))
        x = np.ascontiguousarray(gallery, dtype=np.float32)
        dim = x.shape[1]
        if kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, int(m), faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = int(ef_construction)
            index.add(x)
            return cls(index, kind, effort or DEFAULT_EFFORT[kind])
        if kind != "ivf":
            raise ValueError(f"unknown approximate index kind {kind!r}: hnsw or ivf")
        nlist = int(nlist or default_nlist(x.shape[0]))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        train_size = int(train_size or 64 * nlist)
        index.cp.max_points_per_centroid = max(39, train_size // nlist)
        rng = np.random.default_rng(seed)
        sample = x if x.shape[0] <= train_size else x[np.sort(rng.choice(x.shape[0], train_size, replace=False))]
        index.train(sample)
        index.add(x)
        return cls(index, kind, min(effort or DEFAULT_EFFORT[kind], nlist))

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries, k: int = 10, effort: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``queries [Q, D]`` -> (float32 ``[Q, k]`` scores, int64 ``[Q, k]`` gallery rows; -1 where
        fewer than k vectors were visited)."""
        effort = int(effort or self.effort)
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(effort, int(k))
        else:
            self.index.nprobe = effort
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), int(k))

    def save(self, path: str | Path) -> None:
        """Write the index (FAISS's own format) to a local file."""
        _faiss().write_index(self.index, str(path))

    @classmethod
    def load(cls, path: str | Path, effort: int | None = None) -> "ApproxIndex":
        index = _faiss().read_index(str(path))
        kind = "hnsw" if hasattr(index, "hnsw") else "ivf"
        return cls(index, kind, effort or DEFAULT_EFFORT[kind])


def unique_rows(keys: Sequence) -> np.ndarray:
    """Indices of the first occurrence of each key, in order of first appearance."""
    seen: dict = {}
    for i, key in enumerate(keys):
        seen.setdefault(key, i)
    return np.fromiter(seen.values(), dtype=np.int64, count=len(seen))
