"""End to end: a pseudo box reaches the loss in the frame of the pixels it trains on.

Self-training labels the unaugmented, letterboxed target image, but the student trains on another
copy: the pseudo box goes to original pixels (the round's table, Parquet in the pipeline), is
joined to the raw row by ``pair_id``, and the image is decoded again with a random flip, then
zoomed out; the Ray pipeline and the benchmark share this one path. If any step put the box in another frame than
the pixels, the pseudo term would teach the seeker to look beside the product while the labels
still measured right. The teacher here finds a bright rectangle exactly, so on the augmented
pixels it must find the attached pseudo box again.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from date_core import batch as B
from date_core.adapt import build_views, label_target_set
from date_core.adapt.views import random_zoom_out
from date_core.boxes import box_iou, cxcywh_to_xyxy
from date_core.data.transforms import BatchTransform
from date_core.imaging import PAD_VALUE
from date_core.text import train_wordpiece

from _localising import LocalisingModel

S, L = 96, 8
ADAPT = {"keep_schedule": [1.0], "reliability": {"confidence": 1.0}, "sensitivity_pass": False}
VIEWS = ["identity", "hflip", "scale_0.9"]


def _rows(n: int = 8) -> dict[str, np.ndarray]:
    """Contract rows (``box``: the true rectangle, pixels xyxy): PNG photos of several aspect ratios, each with one white rectangle in its
    left or right third (a mirrored box then misses the rectangle entirely)."""
    rng = np.random.default_rng(0)
    images, queries, boxes = [], [], []
    for i in range(n):
        w, h = [(160, 96), (96, 160), (128, 128), (200, 80)][i % 4]
        img = np.full((h, w, 3), 110, np.uint8)
        bw, bh = int(w * 0.25), int(h * 0.3)
        x1 = int(rng.integers(2, w // 3 - bw // 2)) if i % 2 else int(rng.integers(2 * w // 3 - bw // 2, w - bw - 2))
        y1 = int(rng.integers(2, h - bh - 2))
        img[y1:y1 + bh, x1:x1 + bw] = 255
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        images.append(buf.getvalue())
        queries.append(f"white box number {i}")
        boxes.append(np.array([x1, y1, x1 + bw, y1 + bh], np.float32))
    ids = [f"p{i}" for i in range(n)]
    return {"pair_id": np.array(ids, dtype=object), "image_id": np.array([f"i{i}" for i in range(n)], dtype=object),
            "item_id": np.array([f"s{i}" for i in range(n)], dtype=object), "image": np.array(images, dtype=object),
            "query": np.array(queries, dtype=object), "box": np.array(boxes + [None], dtype=object)[:-1]}


@pytest.fixture(scope="module")
def setup():
    rows = _rows()
    tok = train_wordpiece(rows["query"].tolist(), vocab_size=60)
    model = LocalisingModel().eval()
    batch = BatchTransform(tok, S, L, train=False)(rows)
    assert (batch[B.INPUT_IDS][:, 0] != 1).all()          # no pair takes the model's "confused" branch
    return rows, tok, model, batch


def _label(model, batch):
    return label_target_set(model, [{k: torch.from_numpy(v) for k, v in batch.items()}], build_views(VIEWS), 0, ADAPT)


def _found_again(model, batch) -> torch.Tensor:
    """IoU of the teacher's box on the batch's (augmented) pixels with the batch's box -> [N]."""
    pixels = torch.as_tensor(batch[B.PIXEL_VALUES]).float()
    pred = model(pixels, torch.as_tensor(batch[B.INPUT_IDS]), torch.as_tensor(batch[B.ATTENTION_MASK]))["pred_boxes"]
    return box_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(torch.as_tensor(batch[B.BOXES]).float()))


def test_the_labels_are_right_on_the_unaugmented_images(setup):
    _, _, model, batch = setup
    labels = _label(model, batch).labels
    assert labels["pair_key"].tolist() == batch[B.PAIR_KEY].tolist()
    iou = box_iou(cxcywh_to_xyxy(torch.from_numpy(labels["box"])), cxcywh_to_xyxy(torch.from_numpy(batch[B.BOXES])))
    assert (iou > 0.9).all(), iou


def test_table_join_redecode_flip_zoom_keeps_box_and_pixels_together(setup):
    """The one path of both the Ray pipeline and the benchmark: the round's table (original
    pixels), joined to the raw rows by ``pair_id``, decoded again with a random flip, zoomed out."""
    pytest.importorskip("ray")
    from date_core.adapt import join_pseudo, pseudo_lookup
    from date_core.runtime.labeling import TargetLabeler

    rows, tok, model, _ = setup
    # The real actor's __call__ (decode, views, pair_id); only its model loading is skipped.
    labeler = TargetLabeler.__new__(TargetLabeler)
    labeler.model, labeler.transform, labeler.views = model, BatchTransform(tok, S, L, train=False), build_views(VIEWS)
    labeler.consensus, labeler.sensitivity, labeler.focus_zoom = "median", False, None
    from date_core.adapt.selftrain import select_round

    lookup = pseudo_lookup(select_round(labeler(dict(rows)), 0, ADAPT).table())
    hidden = {k: v for k, v in rows.items() if k != "box"}  # as target_with_pseudo reads them
    joined = join_pseudo(dict(hidden), {k: v for k, v in lookup.items() if k != "p3"})  # p3: not kept
    assert joined["box"].dtype == np.float32 and np.isnan(joined["box"][3]).all()
    assert BatchTransform(tok, S, L, train=False)(joined)[B.HAS_BOX].tolist() == [1.0] * 3 + [0.0] + [1.0] * 4
    joined = join_pseudo(hidden, lookup)
    train = BatchTransform(tok, S, L, train=True, hflip_prob=0.5, jitter=0.0, seed=3)(joined)
    assert train[B.HAS_BOX].sum() == len(rows["pair_id"])
    plain = BatchTransform(tok, S, L, train=False)(rows)
    flipped = ~np.isclose(train[B.BOXES][:, 0], plain[B.BOXES][:, 0], atol=0.02)
    assert 0 < int(flipped.sum()) < flipped.size             # the decode flipped some pairs, not all
    tgt = random_zoom_out({k: torch.from_numpy(v) for k, v in train.items()}, [0.6, 0.9], prob=1.0,
                          generator=torch.Generator().manual_seed(0))
    iou = _found_again(model, tgt)
    assert (iou > 0.8).all(), iou


def test_a_box_in_the_wrong_frame_is_caught(setup):
    """The check itself can fail: the unflipped pseudo box on flipped pixels misses."""
    _, _, model, batch = setup
    labels = _label(model, batch).labels
    tgt = {k: torch.from_numpy(v) for k, v in batch.items()}
    tgt[B.BOXES] = torch.from_numpy(labels["box"])        # the labels' own frame: letterboxed, unflipped
    tgt[B.PIXEL_VALUES] = tgt[B.PIXEL_VALUES].flip(-1)
    assert (_found_again(model, tgt) < 0.1).all()
    assert PAD_VALUE < 200                                   # the rectangle, not the padding, is bright
