"""Training augmentation must not repeat across Ray tasks, processes or epochs.

A ``BatchTransform`` is pickled into every Ray task (as Ray ships a callable); a generator
stored in the instance would make every copy, and every epoch, replay the same flips and jitter.
"""
from __future__ import annotations

import io as _io
import itertools
import multiprocessing as mp
import pickle
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from date_core import batch as B
from date_core.data import transforms
from date_core.data.io import to_numpy_batch
from date_core.data.schema import PAIR_SCHEMA
from date_core.data.transforms import BatchTransform
from date_core.text import train_wordpiece

N = 24  # rows per batch: all-equal flips by chance has probability 2 ** -23
SIZE = 32
BOX = [5.0, 10.0, 25.0, 40.0]  # off-centre in a square 64x64 image: a flip moves cx 15/64 -> 49/64


def _png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    out = _io.BytesIO()
    Image.fromarray(arr).save(out, format="PNG")
    return out.getvalue()


def _table(n: int = N, start: int = 0, image: bytes | None = None) -> pa.Table:
    ids = range(start, start + n)
    return pa.Table.from_pydict({
        "pair_id": [f"p{i}" for i in ids], "image_id": [f"i{i}" for i in ids],
        "image": [image or _png(i) for i in ids], "width": [64] * n, "height": [64] * n,
        "query": ["a red mug"] * n, "box": [BOX] * n, "alt_boxes": [None] * n,
        "domain": ["mall"] * n, "split": ["train"] * n, "item_id": [f"it{i}" for i in ids],
    }, schema=PAIR_SCHEMA)


@pytest.fixture(scope="module")
def tok():
    return train_wordpiece(["a red mug", "blue chair"], vocab_size=60)


def _flips(out: dict) -> np.ndarray:
    """Which rows were mirrored: the box centre moved from 15/64 to 49/64 (exact, no padding)."""
    cx = out[B.BOXES][:, 0]
    assert np.all(np.isclose(cx, 15 / 64, atol=1e-5) | np.isclose(cx, 49 / 64, atol=1e-5))
    return np.isclose(cx, 49 / 64, atol=1e-5)


def _augmented(flips: np.ndarray, out: dict, plain: dict) -> None:
    """The augmentation really ran: both flip outcomes occur and pixels are jittered."""
    assert flips.any() and (~flips).any(), flips
    assert not np.allclose(out[B.PIXEL_VALUES], plain[B.PIXEL_VALUES])


def _apply_fresh(payload: bytes, rows: dict) -> tuple[list[bool], bytes]:
    """In a fresh (spawned) process, like a new Ray worker: unpickle and run once."""
    out = pickle.loads(payload)(rows)
    return _flips(out).tolist(), out[B.PIXEL_VALUES].tobytes()


def test_pickled_copies_and_epochs_differ(tok):
    rows = to_numpy_batch(_table())
    plain = BatchTransform(tok, SIZE, 8)(rows)
    payload = pickle.dumps(BatchTransform(tok, SIZE, 8, train=True, seed=0))
    a, b = pickle.loads(payload), pickle.loads(payload)  # two Ray tasks' copies
    out_a, out_b = a(rows), b(rows)
    fa, fb = _flips(out_a), _flips(out_b)
    _augmented(fa, out_a, plain)
    _augmented(fb, out_b, plain)
    assert not np.array_equal(fa, fb)
    assert not np.allclose(out_a[B.PIXEL_VALUES], out_b[B.PIXEL_VALUES])
    # The next epoch re-runs the same copy on the same rows: new decisions.
    out_a2 = a(rows)
    assert not np.array_equal(_flips(out_a2), fa)
    assert not np.allclose(out_a2[B.PIXEL_VALUES], out_a[B.PIXEL_VALUES])


def test_fresh_processes_differ_even_with_a_fixed_seed(tok):
    """Each fresh worker process starts from scratch (counter at 0): still no repeats."""
    rows = to_numpy_batch(_table())
    payload = pickle.dumps(BatchTransform(tok, SIZE, 8, train=True, seed=0))
    results = []
    for _ in range(2):  # two separate fresh processes, as two tasks / two epochs on new workers
        with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
            results.append(pool.submit(_apply_fresh, payload, rows).result(timeout=120))
    (f1, p1), (f2, p2) = results
    assert any(f1) and not all(f1)
    assert f1 != f2 and p1 != p2


def test_seeded_instance_is_reproducible_where_it_was_built(tok, monkeypatch):
    rows = to_numpy_batch(_table())

    def run(seed):
        monkeypatch.setattr(transforms, "_CALLS", itertools.count())  # a fresh process's counter
        bt = BatchTransform(tok, SIZE, 8, train=True, seed=seed)
        return [bt(rows) for _ in range(2)]

    first, again, other = run(0), run(0), run(1)
    for x, y in zip(first, again):
        np.testing.assert_array_equal(x[B.PIXEL_VALUES], y[B.PIXEL_VALUES])
        np.testing.assert_array_equal(x[B.BOXES], y[B.BOXES])
    assert not np.array_equal(first[0][B.PIXEL_VALUES], first[1][B.PIXEL_VALUES])  # epochs differ
    assert not np.array_equal(first[0][B.PIXEL_VALUES], other[0][B.PIXEL_VALUES])  # seeds differ


def test_eval_transform_stays_deterministic(tok):
    rows = to_numpy_batch(_table(8))
    bt = BatchTransform(tok, SIZE, 8)
    clone = pickle.loads(pickle.dumps(bt))
    np.testing.assert_array_equal(bt(rows)[B.PIXEL_VALUES], clone(rows)[B.PIXEL_VALUES])
    assert not _flips(bt(rows)).any()


def test_ray_tasks_and_epochs_get_different_augmentations(tok, ray_module):
    """to_model_batches on Ray: 4 blocks (tasks) holding the same image, read for 2 epochs."""
    from date_core.runtime.dataio import to_model_batches

    ray = ray_module
    same = _png(0)
    blocks = [_table(8, start=8 * k, image=same) for k in range(4)]
    ds = to_model_batches(ray.data.from_arrow(blocks), tok, SIZE, 8, train=True, batch_size=8, seed=0)

    def epoch() -> np.ndarray:
        rows = list(ds.iter_rows())
        order = np.argsort([r[B.PAIR_KEY] for r in rows])
        return np.asarray([float(rows[i][B.BOXES][0]) for i in order])

    cx1, cx2 = epoch(), epoch()
    f1, f2 = np.isclose(cx1, 49 / 64, atol=1e-5), np.isclose(cx2, 49 / 64, atol=1e-5)
    assert len(f1) == 32 and f1.any() and (~f1).any()
    per_task = {tuple(f1[8 * k:8 * k + 8]) for k in range(4)}
    assert len(per_task) > 1, "every task repeated the same flips"
    assert not np.array_equal(f1, f2), "the second epoch repeated the first"


def test_an_own_counter_makes_an_in_process_run_independent_of_what_ran_before(tok):
    """The benchmark's transforms count their own calls: the same seed gives the same flips
    whatever other transforms did in the process before, and still new flips every epoch."""
    rows = to_numpy_batch(_table())

    def epochs(t: BatchTransform) -> list[list[float]]:
        return [t(rows)[B.BOXES][:, 0].tolist() for _ in range(2)]

    first = epochs(BatchTransform(tok, SIZE, 8, train=True, seed=5, own_counter=True))
    for _ in range(3):  # other work in the process moves the shared counter
        BatchTransform(tok, SIZE, 8, train=True, seed=5)(rows)
    assert epochs(BatchTransform(tok, SIZE, 8, train=True, seed=5, own_counter=True)) == first
    assert first[0] != first[1]                     # two epochs of one instance still differ
    shared = [BatchTransform(tok, SIZE, 8, train=True, seed=5)(rows)[B.BOXES][:, 0].tolist() for _ in range(2)]
    assert shared[0] != shared[1]                   # without it, the process history decides
