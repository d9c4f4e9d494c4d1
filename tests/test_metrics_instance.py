"""Product1M's instance-level metrics, official and textbook, on hand-computed cases that show
where the two definitions part, plus a loop transcription of the definitions on random rankings."""
from __future__ import annotations

import math
import random

import pytest
import torch

from date_core.evaluation.metrics import retrieval_metrics
from date_core.evaluation.metrics_instance import (INSTANCE_NAMES, encode_labels, instance_retrieval_metrics,
                                        official_scores, textbook_scores)

# gallery index -> label: three A, one each of B, C, D
GALLERY = ["A", "A", "A", "B", "C", "D"]
N = 4


def one(ranking, labels, n=N):
    """Official and textbook scores of one query, ``{"official": {...}, "textbook": {...}}``."""
    m = instance_retrieval_metrics(torch.tensor([ranking]), [labels], GALLERY, ns=(n,))
    return {d: {k: m[f"inst/{d}/{k}@{n}"] for k in ("mAP", "Prec", "mAR")} for d in ("official", "textbook")}


def approx(d):
    return {k: pytest.approx(v) for k, v in d.items()}


def test_few_of_many_positives_found_early():
    # [A]: 3 positives. Top 4 = A, B, C, D.
    # official: k = min(4, 3) = 3; one hit (rank 1) in the top 3: AP = 1/1, Prec = 1/3;
    #           mAR: A expects min(1 * floor(4/1), 3) = 3, finds 1 -> 1/3.
    # textbook: AP = 1 / min(3, 4) = 1/3, Prec = 1/4, Recall = 1/3.
    s = one([0, 3, 4, 5, 1, 2], ["A"])
    assert s["official"] == approx({"mAP": 1.0, "Prec": 1 / 3, "mAR": 1 / 3})
    assert s["textbook"] == approx({"mAP": 1 / 3, "Prec": 1 / 4, "mAR": 1 / 3})


def test_hit_after_rank_min_n_positives_does_not_count_officially():
    # [B]: 1 positive, ranked 2nd. official k = min(4, 1) = 1: rank 1 is D -> AP = 0, Prec = 0/1,
    # but mAR looks at the top N = 4: B expects min(4, 1) = 1, finds 1 -> 1.
    # textbook: AP = (1/2) / 1, Prec = 1/4, Recall = 1.
    s = one([5, 3, 0, 1, 2, 4], ["B"])
    assert s["official"] == approx({"mAP": 0.0, "Prec": 0.0, "mAR": 1.0})
    assert s["textbook"] == approx({"mAP": 0.5, "Prec": 0.25, "mAR": 1.0})


def test_repeated_label_and_share_capped_recall():
    # [A, B, B]: P = 3 + 2 * 1 = 5 (B's items count twice), n = 4. Top 4 = B, A, D, A.
    # official: k = 4; hits at 1, 2, 4: AP = (1 + 1 + 3/4) / 3 (found hits) = 11/12, Prec = 3/4;
    #   mAR: floor(4 / 3) = 1 per listed label: A expects min(1, 3) = 1 (finds 2 -> capped 1),
    #   B expects min(2, 1) = 1 (finds 1) -> (1 + 1) / 2 distinct labels = 1.
    #   (Before the 2022-04-20 fix, `label_ap = ...` kept only the last label: 1/2.)
    # textbook: AP = (1 + 1 + 3/4) / min(4, 4) = 11/16, Prec = 3/4, Recall = 3/4.
    s = one([3, 0, 5, 1, 2, 4], ["A", "B", "B"])
    assert s["official"] == approx({"mAP": 11 / 12, "Prec": 3 / 4, "mAR": 1.0})
    assert s["textbook"] == approx({"mAP": 11 / 16, "Prec": 3 / 4, "mAR": 3 / 4})


def test_one_label_flooding_the_top_n():
    # [A, C]: top 4 = A, A, A, B. official mAR: floor(4/2) = 2: A expects 2 (finds 3 -> 2/2),
    # C expects min(2, 1) = 1 (finds 0) -> (1 + 0) / 2 = 1/2; AP = 1 (3 hits of 3 found), Prec = 3/4.
    # textbook: n = 4: AP = (1 + 1 + 1) / 4, Prec = 3/4, Recall = 3/4.
    s = one([0, 1, 2, 3, 4, 5], ["A", "C"])
    assert s["official"] == approx({"mAP": 1.0, "Prec": 3 / 4, "mAR": 1 / 2})
    assert s["textbook"] == approx({"mAP": 3 / 4, "Prec": 3 / 4, "mAR": 3 / 4})


def test_label_missing_from_gallery_zeroes_the_official_query():
    # [A, Z], Z in no gallery item: the script's KeyError -> 0 on all three, still counted.
    # textbook: relevant = the 3 A's, all in the top 3: AP = 3 / min(3, 4) = 1, Prec = 3/4, Recall = 1.
    s = one([0, 1, 2, 3, 4, 5], ["A", "Z"])
    assert s["official"] == approx({"mAP": 0.0, "Prec": 0.0, "mAR": 0.0})
    assert s["textbook"] == approx({"mAP": 1.0, "Prec": 3 / 4, "mAR": 1.0})


def test_more_labels_than_n_zeroes_official_recall_only():
    # [A, B, C, D, D] at N = 4: floor(4 / 5) = 0 expected per label; a retrieved label divides
    # by 0 (the script's ZeroDivisionError) -> mAR 0, while AP and Prec were already counted:
    # P = 3 + 1 + 1 + 2 = 7, k = 4, top 4 = A, A, A, B all relevant -> AP = 1, Prec = 1.
    # textbook: every item relevant, n = 6: AP = 4 / min(6, 4) = 1, Prec = 1, Recall = 4/6.
    s = one([0, 1, 2, 3, 4, 5], ["A", "B", "C", "D", "D"])
    assert s["official"] == approx({"mAP": 1.0, "Prec": 1.0, "mAR": 0.0})
    assert s["textbook"] == approx({"mAP": 1.0, "Prec": 1.0, "mAR": 4 / 6})


def test_means_counts_and_queries_without_relevant_items():
    ranked = torch.tensor([[0, 3, 4, 5, 1, 2], [0, 1, 2, 3, 4, 5]])
    m = instance_retrieval_metrics(ranked, [["A"], ["Z"]], GALLERY, ns=(N,))
    # official averages over both queries (the unknown-label query scores 0);
    # textbook leaves the query without a relevant item out and counts it.
    assert m["inst/official/mAP@4"] == pytest.approx((1.0 + 0.0) / 2)
    assert m["inst/textbook/mAP@4"] == pytest.approx(1 / 3)
    assert (m["inst/n_queries"], m["inst/n_gallery"]) == (2.0, 6.0)
    assert m["inst/n_queries_without_relevant"] == 1.0 and m["inst/n_queries_label_not_in_gallery"] == 1.0
    m = instance_retrieval_metrics(ranked[1:], [["Z"]], GALLERY, ns=(N,))
    assert math.isnan(m["inst/textbook/mAP@4"]) and m["inst/official/mAP@4"] == 0.0


def test_default_cuts_and_names():
    gallery = [f"L{i % 7}" for i in range(120)]
    ranked = torch.stack([torch.randperm(120, generator=torch.Generator().manual_seed(s)) for s in range(3)])
    m = instance_retrieval_metrics(ranked, [["L1", "L2"], ["L3"], ["L0", "L0", "L6"]], gallery)
    assert set(INSTANCE_NAMES) <= set(m) and len(INSTANCE_NAMES) == 18
    assert all(0.0 <= m[k] <= 1.0 for k in INSTANCE_NAMES)


def test_rejects_bad_rankings():
    with pytest.raises(ValueError, match="at least min"):
        instance_retrieval_metrics(torch.tensor([[0, 1, 2]]), [["A"]], GALLERY, ns=(N,))
    with pytest.raises(ValueError, match="twice"):
        instance_retrieval_metrics(torch.tensor([[0, 0, 1, 2]]), [["A"]], GALLERY, ns=(N,))
    with pytest.raises(ValueError, match="outside"):
        instance_retrieval_metrics(torch.tensor([[0, 1, 2, 9]]), [["A"]], GALLERY, ns=(N,))


def test_textbook_map_is_the_pr_map_of_date_core_metrics():
    # single-label queries, a ranking by distinct scores: inst/textbook/mAP@10 == pr/mAP@10
    g = 30
    gallery = [f"L{i % 6}" for i in range(g)]
    scores = torch.rand(5, g, generator=torch.Generator().manual_seed(0))
    q_labels = [[f"L{q}"] for q in range(5)]
    m = instance_retrieval_metrics(scores.argsort(dim=1, descending=True), q_labels, gallery, ns=(10,))
    pr = retrieval_metrics(scores, torch.arange(5), torch.eye(g), torch.tensor([i % 6 for i in range(g)]))
    assert m["inst/textbook/mAP@10"] == pytest.approx(pr["pr/mAP@10"])


def _official_loop(ranking, labels, gallery, n):
    """The official definitions, one query at a time in plain Python (module docstring)."""
    by_label = {}
    for i, lab in enumerate(gallery):
        by_label.setdefault(lab, []).append(i)
    if not labels or any(lab not in by_label for lab in labels):
        return 0.0, 0.0, 0.0
    pos = [i for lab in labels for i in by_label[lab]]
    k = min(n, len(pos), len(ranking))
    hits, ap = 0, 0.0
    for i in range(k):
        if ranking[i] in pos:
            hits += 1
            ap += hits / (i + 1)
    ap, prec = (ap / hits if hits else 0.0), hits / k
    expect = {lab: min(labels.count(lab) * (n // len(labels)), len(by_label[lab])) for lab in labels}
    found = {}
    for i in ranking[:n]:
        if gallery[i] in expect:
            found[gallery[i]] = found.get(gallery[i], 0) + 1
    if any(expect[lab] == 0 for lab in found):
        return ap, prec, 0.0
    return ap, prec, sum(min(f, expect[lab]) / expect[lab] for lab, f in found.items()) / len(set(labels))


def _textbook_loop(ranking, labels, gallery, n):
    rel = [i for i, lab in enumerate(gallery) if lab in set(labels)]
    if not rel:
        return None
    hits, ap = 0, 0.0
    for i, item in enumerate(ranking[:n]):
        if item in rel:
            hits += 1
            ap += hits / (i + 1)
    return ap / min(len(rel), n), hits / n, hits / len(rel)


@pytest.mark.parametrize("seed", range(3))
def test_vectorised_equals_loop_on_random_rankings(seed):
    rng = random.Random(seed)
    gallery = [f"L{rng.randrange(8)}" for _ in range(60)]
    queries = [[f"L{rng.randrange(9)}" for _ in range(rng.randint(1, 12))] for _ in range(40)]  # L8: not in gallery
    ranked = [rng.sample(range(60), 60) for _ in queries]
    counts, code, _ = encode_labels(queries, gallery)
    for n in (5, 10, 50):
        off = official_scores(torch.tensor(ranked), counts, code, n)
        tb, keep = textbook_scores(torch.tensor(ranked), counts, code, n)
        want_tb = [t for t in (_textbook_loop(r, q, gallery, n) for r, q in zip(ranked, queries)) if t is not None]
        for j, (r, q) in enumerate(zip(ranked, queries)):
            want = _official_loop(r, q, gallery, n)
            got = (float(off["mAP"][j]), float(off["Prec"][j]), float(off["mAR"][j]))
            assert got == pytest.approx(want, abs=1e-6), (n, q)
        got_tb = list(zip(*(tb[k].tolist() for k in ("mAP", "Prec", "mAR"))))
        assert int(keep.sum()) == len(want_tb)
        for g, w in zip(got_tb, want_tb):
            assert g == pytest.approx(w, abs=1e-6)
