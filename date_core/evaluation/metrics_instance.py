"""Instance-level retrieval metrics: Product1M's evaluation protocol, official and textbook.

A *query* is a multi-product sample (image + caption) with a list of instance labels (its
``instance_ids``; Product1M's ``#;#`` field, order and repeats kept: ``AHC 黄金眼霜`` listed twice
means two of them in the set). A *gallery item* is a single-product sample with one label
(Product1M's gallery lines carry a label list; the official script takes its first label,
and so should the caller). A gallery item is relevant to a query when its label is one of the
query's labels. Each query's ranking is given as gallery indices, best first (e.g. the ids of
``date_core.retrieval.search.exact_search``); ties are the ranker's business.

Names (for N in :data:`INSTANCE_NS` = 10, 50, 100): ``inst/official/{mAP,Prec,mAR}@N`` and
``inst/textbook/{mAP,Prec,mAR}@N``, plus counts ``inst/n_queries``, ``inst/n_gallery``,
``inst/n_queries_without_relevant`` and ``inst/n_queries_label_not_in_gallery``.

**Official** (``CAPTURE/evaluate_suit.py`` of github.com/zhanxlin/Product1M, the version after
issue #3 of 2022-04-20 changed ``label_ap = ...`` to ``label_ap += ...`` in ``compute_ar``; the
earlier version kept only the last label's recall). Per query, with ``L`` its label list
(repeats kept, ``|L|`` its length), ``U`` its distinct labels, ``c_l`` how often label ``l`` is
in ``L``, ``g_l`` the gallery items labelled ``l``, and ``R`` the ranking's length:

- ``P = sum_{l in L} g_l`` (the script's ``pos_set`` is a list: a repeated label counts its
  gallery items twice) and ``k = min(N, P, R)``;
- ``mAP@N``: ``AP = sum_{i<=k} rel_i * hits_i / i  /  hits_k``: divided by the hits *found* in
  the top k (0 without a hit), not by the number of positives, so one hit at rank 1 scores 1;
- ``Prec@N = hits_k / k``: divided by ``min(N, P)``, not by N, and counted over the top k only;
- ``mAR@N``: over the top N (not k) items, each label expects ``e_l = min(c_l * floor(N / |L|),
  g_l)`` hits (its share of the query's labels), finds ``f_l`` (items labelled ``l``);
  ``AR = sum_{l in U, f_l > 0} min(f_l, e_l) / e_l  /  |U|``;
- failures the script catches with a bare ``except`` and counts as queries all the same: a
  query with a label no gallery item has (``KeyError``) or an empty label list / ranking
  (``ZeroDivisionError``) scores 0 on all three; a query that retrieves a label whose
  ``e_l`` is 0 (``|L| > N``) scores 0 on ``mAR@N`` only (AP and Prec were already added).
  Means are over *all* queries.

**Textbook** (the definitions of ``date_core.evaluation.metrics``' ``pr/mAP@10``): relevant items are the
gallery items whose label is in ``U`` (each once), ``n = sum_{l in U} g_l``; a query with
``n = 0`` is left out (and counted in ``inst/n_queries_without_relevant``), labels missing from
the gallery simply contribute no relevant item:

- ``mAP@N``: ``AP@N = sum_{i<=N} P@i * rel_i / min(n, N)`` (:func:`~date_core.evaluation.metrics.average_precision_at_k`);
- ``Prec@N = hits_N / N``;
- ``mAR@N``: the mean over queries of ``Recall@N = hits_N / n``.

Where they differ (tests/test_metrics_instance.py computes each case by hand): a ranking that
finds few of many positives early scores high on official mAP and Prec (1 for one hit at rank 1)
and low on textbook; official Prec rewards small positive sets (2 of 2 found -> 1, textbook
2/10); hits ranked after ``min(N, P)`` do not count officially; repeated labels raise ``P`` and
the label's expected share in official mAR; official mAR caps each label at its share of N, so
a ranking that floods N with one label's items cannot score on the others.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from date_core.evaluation.metrics import _t, average_precision_at_k

INSTANCE_NS = (10, 50, 100)
DEFINITIONS = ("official", "textbook")
INSTANCE_NAMES = tuple(f"inst/{d}/{m}@{n}" for d in DEFINITIONS for n in INSTANCE_NS for m in ("mAP", "Prec", "mAR"))


def encode_labels(query_labels: Sequence[Sequence[str]], gallery_labels: Sequence[str]) -> tuple[Tensor, Tensor, list[str]]:
    """String labels -> integer codes over one vocabulary.

    ``query_labels``: Q lists of labels (repeats count); ``gallery_labels``: G labels, one per
    gallery item. Returns (``counts [Q, V]`` int64: how often label v is in query q's list,
    ``gallery_code [G]`` int64, ``vocab`` the V label strings, gallery labels first).
    """
    vocab: dict[str, int] = {}
    gallery_code = torch.tensor([vocab.setdefault(str(lab), len(vocab)) for lab in gallery_labels], dtype=torch.long)
    rows = [[vocab.setdefault(str(lab), len(vocab)) for lab in labs] for labs in query_labels]
    counts = torch.zeros(len(rows), max(len(vocab), 1), dtype=torch.long)
    for q, codes in enumerate(rows):
        if codes:
            counts[q].index_add_(0, torch.tensor(codes), torch.ones(len(codes), dtype=torch.long))
    return counts, gallery_code, list(vocab)


def _check_ranked(ranked: Tensor, n_gallery: int, ns: Sequence[int]) -> None:
    if ranked.shape[1] < min(max(ns), n_gallery):
        raise ValueError(f"ranked has {ranked.shape[1]} columns: rank at least min(max N = {max(ns)}, "
                         f"gallery size {n_gallery}) items per query")
    if ranked.numel() and (int(ranked.min()) < 0 or int(ranked.max()) >= n_gallery):
        raise ValueError(f"ranked holds indices outside the gallery [0, {n_gallery})")
    srt = ranked.sort(dim=1).values
    if bool((srt[:, 1:] == srt[:, :-1]).any()):
        raise ValueError("a ranking lists the same gallery item twice")


def official_scores(ranked: Tensor, counts: Tensor, gallery_code: Tensor, n: int) -> dict[str, Tensor]:
    """Per-query ``AP``, ``Prec`` and ``AR`` at cut ``n`` as Product1M's ``evaluate_suit.py``
    computes them (module docstring). ``ranked [Q, R]`` gallery indices, ``counts [Q, V]``,
    ``gallery_code [G]`` (:func:`encode_labels`). Returns ``{"mAP", "Prec", "mAR": [Q] float32}``.
    """
    q, r = ranked.shape
    g_count = torch.bincount(gallery_code, minlength=counts.shape[1])         # [V] g_l
    code = gallery_code[ranked]                                              # [Q, R]
    rel = counts.gather(1, code) > 0                                         # [Q, R]
    n_labels = counts.sum(dim=1)                                             # [Q] |L|
    n_distinct = (counts > 0).sum(dim=1)                                     # [Q] |U|
    n_pos = (counts * g_count[None]).sum(dim=1)                              # [Q] P, repeats counted
    missing = ((counts > 0) & (g_count == 0)[None]).any(dim=1)
    failed = missing | (n_pos == 0)                                          # the script's except: all 0

    k = n_pos.clamp(max=min(n, r))                                           # [Q] min(N, P, R)
    in_k = torch.arange(r)[None] < k[:, None]
    hit = (rel & in_k).float()
    hits_so_far = hit.cumsum(dim=1)
    found = hits_so_far[:, -1] if r else torch.zeros(q)
    ap = (hit * hits_so_far / torch.arange(1, r + 1, dtype=torch.float32)).sum(dim=1) / found.clamp(min=1)
    prec = found / k.clamp(min=1).float()

    top_code, top_rel = code[:, :n], rel[:, :n]                              # mAR looks at the top N, not k
    found_l = torch.zeros_like(counts).scatter_add_(1, top_code, top_rel.long())      # [Q, V] f_l
    share = counts * torch.div(n, n_labels.clamp(min=1), rounding_mode="floor")[:, None]
    expect = torch.minimum(share, g_count[None].expand_as(share))            # [Q, V] e_l
    ratio = torch.minimum(found_l, expect).float() / expect.clamp(min=1).float()
    ar = torch.where(found_l > 0, ratio, 0.0).sum(dim=1) / n_distinct.clamp(min=1).float()
    ar_failed = ((found_l > 0) & (expect == 0)).any(dim=1)                   # ZeroDivisionError in compute_ar

    zero = torch.zeros(q)
    return {"mAP": torch.where(failed, zero, ap), "Prec": torch.where(failed, zero, prec),
            "mAR": torch.where(failed | ar_failed, zero, ar)}


def textbook_scores(ranked: Tensor, counts: Tensor, gallery_code: Tensor, n: int) -> tuple[dict[str, Tensor], Tensor]:
    """Per-query textbook ``AP@n``, ``Prec@n`` and ``Recall@n`` (module docstring), same inputs
    as :func:`official_scores`. Returns (``{"mAP", "Prec", "mAR": [Q'] float32}`` for the Q'
    queries with a relevant gallery item, ``keep [Q]`` bool marking them)."""
    g_count = torch.bincount(gallery_code, minlength=counts.shape[1])
    present = counts > 0
    n_rel = (present.long() * g_count[None]).sum(dim=1)                      # [Q] n, each item once
    keep = n_rel > 0
    rel = present.gather(1, gallery_code[ranked])[keep, :n]                  # [Q', <=N]
    n_rel = n_rel[keep]
    hits = rel.sum(dim=1).float()
    return {"mAP": average_precision_at_k(rel, n_rel, n), "Prec": hits / n,
            "mAR": hits / n_rel.float()}, keep


def instance_retrieval_metrics(ranked, query_labels: Sequence[Sequence[str]], gallery_labels: Sequence[str],
                               ns: Sequence[int] = INSTANCE_NS) -> dict[str, float]:
    """Product1M's metrics, official and textbook, for N in ``ns`` (names in the module docstring).

    ``ranked [Q, R]`` int gallery indices per query, best first, distinct within a row, with
    ``R >= min(max(ns), G)`` (a cut-off ranking would make the metrics depend on where it was
    cut); ``query_labels``: Q label lists (repeats kept); ``gallery_labels``: G labels. A
    textbook metric is NaN when no query has a relevant gallery item.
    """
    ranked = _t(ranked).long()
    if ranked.dim() != 2 or ranked.shape[0] != len(query_labels):
        raise ValueError(f"ranked {tuple(ranked.shape)} must be [Q, R] with Q = {len(query_labels)} queries")
    if ranked.shape[0] == 0 or len(gallery_labels) == 0:
        raise ValueError("instance retrieval metrics need at least one query and one gallery item")
    _check_ranked(ranked, len(gallery_labels), ns)
    counts, gallery_code, _ = encode_labels(query_labels, gallery_labels)
    g_count = torch.bincount(gallery_code, minlength=counts.shape[1])
    out = {"inst/n_queries": float(ranked.shape[0]), "inst/n_gallery": float(len(gallery_labels)),
           "inst/n_queries_label_not_in_gallery": float(((counts > 0) & (g_count == 0)[None]).any(dim=1).sum())}
    for n in ns:
        for name, v in official_scores(ranked, counts, gallery_code, n).items():
            out[f"inst/official/{name}@{n}"] = float(v.mean())
        scores, keep = textbook_scores(ranked, counts, gallery_code, n)
        out["inst/n_queries_without_relevant"] = float((~keep).sum())
        for name, v in scores.items():
            out[f"inst/textbook/{name}@{n}"] = float(v.mean()) if v.numel() else float("nan")
    return out
