"""Exact search equals brute force (same ids, same order, up to ties) with any block size, and
the approximate indexes reach their documented recall floor on a seeded clustered set."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from date_core.retrieval.search import (ApproxIndex, brute_force, default_nlist, exact_search, recall_at_k, same_results,
                              unique_rows)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, n_queries: int, dim: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A gallery of products (4 images each) on a low-dimensional subspace, and queries near
    random products: the structure bench/search.py measures recall on."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((n // 4, 12)) @ rng.standard_normal((12, dim)))
    gallery = unit(np.repeat(centres, 4, axis=0) + 0.6 * unit(rng.standard_normal((n // 4 * 4, dim))))
    queries = unit(centres[rng.integers(0, len(centres), n_queries)] + 0.9 * unit(rng.standard_normal((n_queries, dim))))
    return queries, gallery


@pytest.mark.parametrize("block_bytes", [4096, 64 * 1024, 256 * 1024 * 1024])
def test_exact_equals_brute_force(block_bytes):
    queries, gallery = clustered(5000, 37, seed=1)
    ref_s, ref_i = brute_force(queries, gallery, 10)
    s, i = exact_search(queries, gallery, 10, block_bytes=block_bytes)
    assert s.shape == i.shape == (37, 10) and s.dtype == np.float32 and i.dtype == np.int64
    np.testing.assert_allclose(s, ref_s, atol=1e-5)
    assert same_results(i, s, ref_i, ref_s).all()
    assert (np.diff(s, axis=1) <= 1e-7).all()  # best first


def test_exact_ties_and_small_gallery():
    gallery = unit(np.eye(4, 8, dtype=np.float32).repeat(3, axis=0))  # every row three times: ties
    queries = gallery[[0, 5]] + 0
    s, i = exact_search(queries, gallery, 3, block_bytes=64)
    assert sorted(i[0].tolist()) == [0, 1, 2] and sorted(i[1].tolist()) == [3, 4, 5]
    np.testing.assert_allclose(s, 1.0, atol=1e-6)
    s, i = exact_search(queries, gallery[:2], 10)
    assert s.shape == (2, 2)
    # a torch gallery works too, and k must be positive
    s2, i2 = exact_search(torch.from_numpy(queries), torch.from_numpy(gallery), 3)
    assert sorted(i2[1].tolist()) == [3, 4, 5]
    with pytest.raises(ValueError, match="k must be"):
        exact_search(queries, gallery, 0)
    with pytest.raises(ValueError, match=r"\[Q, D\]"):
        exact_search(queries, gallery[:, :4], 3)


def test_same_results_detects_a_real_difference():
    s = np.array([[0.9, 0.8, 0.7]], np.float32)
    assert same_results(np.array([[1, 2, 3]]), s, np.array([[1, 2, 3]]), s).all()
    assert not same_results(np.array([[1, 2, 3]]), s, np.array([[2, 1, 3]]), s).any()
    tied = np.array([[0.9, 0.8, 0.8]], np.float32)
    assert same_results(np.array([[1, 2, 3]]), tied, np.array([[1, 3, 2]]), tied).all()


@pytest.mark.parametrize("kind,floor", [("hnsw", 0.95), ("ivf", 0.95)])
def test_approximate_recall_floor(kind, floor):
    """The documented floor: recall@10 >= 0.95 at the default effort on a clustered set."""
    queries, gallery = clustered(20000, 200, seed=2)
    _, exact_i = exact_search(queries, gallery, 10)
    index = ApproxIndex.build(gallery, kind, threads=1)
    assert len(index) == len(gallery)
    _, approx_i = index.search(queries, 10)
    assert recall_at_k(approx_i, exact_i) >= floor
    # effort is the knob: the least effort finds less
    _, low = index.search(queries, 10, effort=1 if kind == "ivf" else 10)
    assert recall_at_k(low, exact_i) < recall_at_k(approx_i, exact_i)


def test_approximate_index_round_trips(tmp_path):
    queries, gallery = clustered(2000, 20, seed=3)
    index = ApproxIndex.build(gallery, "ivf", nlist=16)
    index.save(tmp_path / "ann.faiss")
    loaded = ApproxIndex.load(tmp_path / "ann.faiss", effort=16)
    assert loaded.kind == "ivf" and len(loaded) == 2000
    np.testing.assert_array_equal(loaded.search(queries, 5)[1], exact_search(queries, gallery, 5)[1])
    with pytest.raises(ValueError, match="hnsw or ivf"):
        ApproxIndex.build(gallery, "lsh")


def test_helpers():
    assert default_nlist(10) == 1 and default_nlist(575_000) == 2048
    assert unique_rows(["b", "a", "b", "c", "a"]).tolist() == [0, 1, 3]
    assert recall_at_k(np.array([[1, 2, 9]]), np.array([[1, 2, 3]])) == pytest.approx(2 / 3)
