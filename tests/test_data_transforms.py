"""BatchTransform: contract rows -> the batch contract, exact box mapping, augmentation, pickling."""
from __future__ import annotations

import io as _io
import pickle

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from date_core import batch as B
from date_core.data.io import to_numpy_batch
from date_core.data.schema import PAIR_SCHEMA
from date_core.data.transforms import BatchTransform, decode_letterbox, pixel_values_from_canvases
from date_core.imaging import (
    PAD_VALUE, letterbox_cxcywh_to_xyxy_pixels, letterbox_image, to_pixel_values, xyxy_pixels_to_letterbox_cxcywh,
)
from date_core.text import train_wordpiece


def _encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    out = _io.BytesIO()
    Image.fromarray(arr).save(out, format=fmt, **kw)
    return out.getvalue()


def _image(w: int, h: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Smooth content (gradients + blocks) so that JPEG and resampling errors stay small.
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1).astype(np.uint8)
    arr[h // 4:h // 2, w // 4:w // 2] = rng.integers(0, 255, 3, dtype=np.uint8)
    return arr


@pytest.fixture(scope="module")
def tok():
    return train_wordpiece(["a red mug", "blue chair with stripes", "红色连衣裙", "a pack of coffee"], vocab_size=200)


def _rows(images, boxes, alts=None, queries=None, weights=None) -> pa.Table:
    n = len(images)
    data = {
        "pair_id": [f"p{i}" for i in range(n)], "image_id": [f"i{i}" for i in range(n)],
        "image": images, "width": [0] * n, "height": [0] * n,
        "query": queries or ["a red mug"] * n, "box": boxes,
        "alt_boxes": alts or [None] * n, "domain": ["mall"] * n, "split": ["train"] * n,
        "item_id": [f"it{i % 2}" for i in range(n)],
    }
    table = pa.Table.from_pydict(data, schema=PAIR_SCHEMA)
    if weights is not None:
        table = table.append_column("box_weight", pa.array(weights, pa.float32()))
    return table


def test_output_matches_batch_contract(tok):
    imgs = [_encode(_image(320, 240, i), "JPEG", quality=95) for i in range(3)]
    table = _rows(imgs, [[10, 20, 110, 220], None, [0, 0, 320, 240]],
                  alts=[[[30, 30, 60, 60]], None, []])
    out = BatchTransform(tok, 64, 12)(to_numpy_batch(table))
    expect = {
        B.PIXEL_VALUES: (np.float32, (3, 3, 64, 64)), B.INPUT_IDS: (np.int64, (3, 12)),
        B.ATTENTION_MASK: (np.int64, (3, 12)), B.BOXES: (np.float32, (3, 4)),
        B.HAS_BOX: (np.float32, (3,)), B.BOX_WEIGHT: (np.float32, (3,)),
        B.ALT_BOXES: (np.float32, (3, B.MAX_ALT_BOXES, 4)), B.ALT_MASK: (np.float32, (3, B.MAX_ALT_BOXES)),
        B.ITEM_KEY: (np.int64, (3,)), B.IMAGE_KEY: (np.int64, (3,)), B.PAIR_KEY: (np.int64, (3,)),
        B.ORIG_SIZE: (np.float32, (3, 2)),
    }
    assert set(out) == set(expect)
    for key, (dtype, shape) in expect.items():
        assert out[key].dtype == dtype and out[key].shape == shape, key
    np.testing.assert_array_equal(out[B.HAS_BOX], [1, 0, 1])
    np.testing.assert_array_equal(out[B.BOXES][1], np.zeros(4))
    np.testing.assert_allclose(out[B.BOXES][2], [0.5, 0.5, 1.0, 0.75], atol=1e-6)
    np.testing.assert_array_equal(out[B.ALT_MASK].sum(1), [1, 0, 0])
    np.testing.assert_array_equal(out[B.BOX_WEIGHT], [1, 1, 1])
    np.testing.assert_array_equal(out[B.ORIG_SIZE], [[320, 240]] * 3)
    assert out[B.ITEM_KEY][0] == out[B.ITEM_KEY][2] != out[B.ITEM_KEY][1]
    assert out[B.PAIR_KEY][0] == B.stable_key("p0")


def test_boxes_map_exactly_both_ways(tok):
    w, h, size = 300, 200, 96
    box = np.array([12.5, 30.0, 250.0, 190.0])
    out = BatchTransform(tok, size, 8)(to_numpy_batch(_rows([_encode(_image(w, h), "PNG")], [box.tolist()])))
    _, lb = letterbox_image(Image.new("RGB", (w, h)), size)
    np.testing.assert_allclose(out[B.BOXES][0], xyxy_pixels_to_letterbox_cxcywh(box, lb), atol=1e-6)
    back = letterbox_cxcywh_to_xyxy_pixels(out[B.BOXES][0], lb)
    np.testing.assert_allclose(back, box, atol=1e-3)


def test_png_canvas_equals_imaging_letterbox(tok):
    arr = _image(150, 90, 3)
    canvas = np.full((64, 64, 3), PAD_VALUE, np.uint8)
    decode_letterbox(_encode(arr, "PNG"), 64, canvas)
    expect, _ = letterbox_image(Image.fromarray(arr), 64)
    np.testing.assert_array_equal(canvas, expect)


def test_jpeg_draft_matches_full_decode_closely():
    # A large JPEG is drafted at 1/4 scale for a 96 px input; the canvas stays within a few
    # grey levels of the full-resolution path and its geometry is identical.
    data = _encode(_image(1200, 800, 5), "JPEG", quality=95)
    full = np.full((96, 96, 3), PAD_VALUE, np.uint8)
    fast = full.copy()
    lb_full = decode_letterbox(data, 96, full, draft=False)
    lb_fast = decode_letterbox(data, 96, fast, draft=True)
    assert lb_full == lb_fast
    assert (full == PAD_VALUE).all(-1).sum() == (fast == PAD_VALUE).all(-1).sum()
    assert np.abs(full.astype(int) - fast.astype(int)).mean() < 3.0


def test_hflip_mirrors_pixels_and_boxes(tok):
    arr = _image(128, 128, 7)
    table = _rows([_encode(arr, "PNG")], [[10, 20, 50, 100]], alts=[[[70, 5, 120, 40]]])
    plain = BatchTransform(tok, 64, 8)(to_numpy_batch(table))
    flip = BatchTransform(tok, 64, 8, train=True, hflip_prob=1.0, jitter=0.0, seed=0)(to_numpy_batch(table))
    np.testing.assert_array_equal(flip[B.PIXEL_VALUES], plain[B.PIXEL_VALUES][..., ::-1])
    for key in (B.BOXES, B.ALT_BOXES):
        mirrored = plain[key].copy()
        mirrored[..., 0] = 1.0 - plain[key][..., 0]
        real = flip[key] if key == B.BOXES else flip[key][:, :1]
        np.testing.assert_allclose(real, mirrored if key == B.BOXES else mirrored[:, :1], atol=1e-6)


def test_alt_boxes_are_truncated_to_slots_and_box_weight_is_read(tok):
    alts = [[[i, i, i + 5.0, i + 5.0] for i in range(B.MAX_ALT_BOXES + 4)], None]
    table = _rows([_encode(_image(64, 64), "PNG")] * 2, [[1, 1, 30, 30], [2, 2, 9, 9]], alts=alts,
                  weights=[0.25, None])
    out = BatchTransform(tok, 32, 8)(to_numpy_batch(table))
    np.testing.assert_array_equal(out[B.ALT_MASK].sum(1), [B.MAX_ALT_BOXES, 0])
    np.testing.assert_allclose(out[B.BOX_WEIGHT], [0.25, 1.0])


def test_lut_normalisation_is_bit_identical():
    canv = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(pixel_values_from_canvases(canv), to_pixel_values(canv))


def test_pickles_without_the_loaded_tokenizer(tmp_path, tok):
    tok.save_pretrained(tmp_path / "tok")
    bt = BatchTransform(str(tmp_path / "tok"), 32, 8)
    table = _rows([_encode(_image(40, 30), "JPEG")], [None], queries=["红色连衣裙"])
    first = bt(to_numpy_batch(table))
    clone = pickle.loads(pickle.dumps(bt))
    assert clone._tok is None  # reloaded lazily where it runs
    np.testing.assert_array_equal(clone(to_numpy_batch(table))[B.INPUT_IDS], first[B.INPUT_IDS])
