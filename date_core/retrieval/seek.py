"""Seek products by text in an indexed catalogue: retrieve, ground, optionally re-rank.

DATE's two seekers cooperate here: the retrieval seeker's embeddings find candidate images in
the index (:mod:`date_core.retrieval.indexing`), and the grounding seeker boxes the product in each of them.
With ``rerank_weight > 0`` the candidates are re-ordered by similarity + weight x grounding
confidence (:func:`date_core.model.seekers.combine_scores`, the same rule as
:func:`~date_core.model.seekers.rerank_by_grounding`). Whether that helps is measured by
:func:`rerank_recall` (``bench/rerank.py``); the default weight is what the measurement supports.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from date_core.retrieval.indexing import CatalogueIndex, ImageStore
from date_core.model.seekers import combine_scores

#: Re-ranking by grounding confidence is off by default: ``bench/rerank.py`` measures whether it
#: lifts R@1 (BENCHMARKS.md has the current figure).
DEFAULT_RERANK_WEIGHT = 0.0


@dataclass
class Hit:
    """One result: the image, the product's box in it (x1, y1, x2, y2, original pixels), the
    retrieval similarity, the grounding confidence and the final score it was ranked by."""

    rank: int
    image_id: str
    item_id: str
    score: float
    similarity: float
    confidence: float
    box: list[float]
    image: Any = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "image"}


def seek(seeker, index: CatalogueIndex, queries: Sequence[str], k: int = 5, *, data: str | None = None,
         approximate: bool = False, rerank_weight: float = DEFAULT_RERANK_WEIGHT,
         candidates: int | None = None) -> list[list[Hit]]:
    """Top-``k`` hits per query, each grounded. ``candidates`` (default ``k``, at least ``k``)
    images per query are retrieved and grounded; re-ranking picks the best ``k`` of them.
    Images are read from ``data`` (default: the dataset the index was built from)."""
    if k < 1:
        raise ValueError("k must be >= 1")
    store = ImageStore(data or index.manifest["data"])
    n_cand = max(k, int(candidates or k))
    sims, rows = index.search(seeker.encode_queries(list(queries)), n_cand, approximate=approximate)
    results = []
    for query, q_sims, q_rows in zip(queries, sims, rows):
        keep = q_rows >= 0  # an approximate index may find fewer than asked
        q_sims, q_rows = q_sims[keep], q_rows[keep]
        images = store.get([index.source[r] for r in q_rows], [index.row[r] for r in q_rows])
        grounded = seeker.ground(images, [query] * len(images)) if images else None
        conf = grounded.confidence if grounded is not None else np.zeros(0, np.float32)
        score = combine_scores(torch.from_numpy(q_sims), torch.from_numpy(conf), rerank_weight).numpy()
        order = np.argsort(-score, kind="stable")[:k]
        results.append([Hit(rank=rank + 1, image_id=index.image_id[q_rows[j]], item_id=index.item_id[q_rows[j]],
                            score=float(score[j]), similarity=float(q_sims[j]), confidence=float(conf[j]),
                            box=[float(v) for v in grounded.boxes[j]], image=images[j])
                        for rank, j in enumerate(order)])
    return results


def rerank_recall(seeker, index: CatalogueIndex, queries: Sequence[str], query_items: Sequence[str],
                  weights: Sequence[float], candidates: int = 10, batch_size: int = 16,
                  per_query: bool = False) -> dict[float, dict[str, Any]]:
    """R@1 and R@5 of each re-ranking weight (0 = retrieval alone) on the same candidates.

    A query is relevant to an indexed image when the image shows its item (``item_ids``).
    Each query's top-``candidates`` are grounded once; every weight re-orders those.
    Returns ``{weight: {"R@1": ..., "R@5": ..., "queries": Q}}``, plus each query's hits
    (``"hits@1"``, ``"hits@5"``: bool lists) with ``per_query``, for paired comparisons.
    """
    store = ImageStore(index.manifest["data"])
    emb = seeker.encode_queries(list(queries))
    sims, rows = index.search(emb, candidates)
    hits: dict[float, dict[int, list[bool]]] = {w: {1: [], 5: []} for w in weights}
    for start in range(0, len(queries), batch_size):
        sl = slice(start, start + batch_size)
        flat = rows[sl].reshape(-1)
        images = store.get([index.source[r] for r in flat], [index.row[r] for r in flat])
        q_rep = [q for q in queries[sl] for _ in range(rows.shape[1])]
        conf = seeker.ground(images, q_rep).confidence.reshape(-1, rows.shape[1])
        rel = np.array([[item in index.item_ids[r] for r in q_rows] for item, q_rows in zip(query_items[sl], rows[sl])])
        for w in weights:
            score = combine_scores(torch.from_numpy(sims[sl]), torch.from_numpy(conf), w).numpy()
            ranked = np.take_along_axis(rel, np.argsort(-score, axis=1, kind="stable"), 1)
            hits[w][1] += ranked[:, :1].any(axis=1).tolist()
            hits[w][5] += ranked[:, :5].any(axis=1).tolist()
    n = len(queries)
    out: dict[float, dict[str, Any]] = {}
    for w, h in hits.items():
        out[w] = {"R@1": sum(h[1]) / n, "R@5": sum(h[5]) / n, "queries": n}
        if per_query:
            out[w].update({"hits@1": h[1], "hits@5": h[5]})
    return out
