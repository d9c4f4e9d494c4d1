"""A small in-memory scene generator for the model tests: real images with drawn objects, so
that grounding needs the query (every image holds several objects; the query names one by
colour and shape) and retrieval needs the whole description.

Not the benchmark (that is ``date_core.data.productworld``); this only exists so the model's
tests do not depend on the data layer.
"""
from __future__ import annotations

import itertools
import random

import numpy as np
import torch
from PIL import Image, ImageDraw

from date_core import batch as B
from date_core.imaging import letterbox_image, to_pixel_values, xyxy_pixels_to_letterbox_cxcywh
from date_core.text import tokenize, train_wordpiece

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
           "purple": (140, 60, 180), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (25, 25, 25)}
SHAPES = ("box", "ball", "cone", "ring")


def draw_object(draw: ImageDraw.ImageDraw, shape: str, colour: tuple, box: tuple) -> None:
    x1, y1, x2, y2 = box
    if shape == "box":
        draw.rectangle(box, fill=colour)
    elif shape == "ball":
        draw.ellipse(box, fill=colour)
    elif shape == "cone":
        draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=colour)
    else:
        w = max(2, int(min(x2 - x1, y2 - y1) / 4))
        draw.ellipse(box, outline=colour, width=w)


def make_scene(rng: random.Random, objects: list[tuple[str, str]], size: tuple[int, int]):
    """An image holding ``objects`` [(colour, shape)] at random non-overlapping places.

    Returns (PIL image, [x1, y1, x2, y2] box per object in pixels).
    """
    w, h = size
    bg = tuple(rng.randint(90, 160) for _ in range(3))
    img = Image.new("RGB", size, bg)
    draw = ImageDraw.Draw(img)
    boxes: list[tuple[float, float, float, float]] = []
    for colour, shape in objects:
        for _ in range(200):
            side = rng.uniform(0.2, 0.42) * min(w, h)
            bw, bh = side * rng.uniform(0.8, 1.25), side * rng.uniform(0.8, 1.25)
            x1, y1 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            cand = (x1, y1, x1 + bw, y1 + bh)
            if all(cand[2] < b[0] or cand[0] > b[2] or cand[3] < b[1] or cand[1] > b[3] for b in boxes):
                break
        boxes.append(cand)
        draw_object(draw, shape, COLOURS[colour], tuple(int(round(v)) for v in cand))
    return img, [list(map(float, b)) for b in boxes]


def overfit_pairs(n_images: int = 16, seed: int = 0, size: tuple[int, int] = (96, 96)):
    """``n_images`` images with two objects each, every (colour, shape) used once overall;
    both objects of each image are queried -> ``2 * n_images`` pairs. Relevance for retrieval
    is the image (``item_id`` = the image): each query's object exists in exactly one image.

    Returns a list of row dicts: image (PIL), query, box (xyxy pixels), image_id, item_id.
    """
    rng = random.Random(seed)
    combos = list(itertools.product(COLOURS, SHAPES))
    if 2 * n_images > len(combos):
        raise ValueError(f"at most {len(combos) // 2} images with unique objects")
    rng.shuffle(combos)
    rows = []
    for i in range(n_images):
        objs = combos[2 * i: 2 * i + 2]
        img, boxes = make_scene(rng, objs, size)
        for (colour, shape), box in zip(objs, boxes):
            rows.append({"image": img, "query": f"{colour} {shape}", "box": box,
                         "image_id": f"img{i}", "item_id": f"img{i}", "pair_id": f"img{i}-{colour}-{shape}"})
    return rows


def random_scene_rows(n_images: int, seed: int = 0, size: tuple[int, int] = (96, 96),
                      n_objects: tuple[int, int] = (2, 4)):
    """Random scenes (2-4 distinct objects, one queried) for learning-speed experiments."""
    rng = random.Random(seed)
    combos = list(itertools.product(COLOURS, SHAPES))
    rows = []
    for i in range(n_images):
        objs = rng.sample(combos, rng.randint(*n_objects))
        img, boxes = make_scene(rng, objs, size)
        j = rng.randrange(len(objs))
        colour, shape = objs[j]
        rows.append({"image": img, "query": f"{colour} {shape}", "box": boxes[j],
                     "image_id": f"s{seed}-{i}", "item_id": f"{colour}-{shape}", "pair_id": f"s{seed}-{i}"})
    return rows


def tokenizer_for(rows, vocab_size: int = 200):
    return train_wordpiece([r["query"] for r in rows] * 2, vocab_size=vocab_size)


def rows_to_batch(rows, tokenizer, image_size: int = 96, max_len: int = 8) -> dict[str, torch.Tensor]:
    """Rows -> a model batch with every key of :mod:`date_core.batch`."""
    canvases, boxes, sizes = [], [], []
    for r in rows:
        canvas, lb = letterbox_image(r["image"], image_size)
        canvases.append(canvas)
        boxes.append(xyxy_pixels_to_letterbox_cxcywh(np.asarray(r["box"]), lb))
        sizes.append((r["image"].width, r["image"].height))
    ids, mask = tokenize(tokenizer, [r["query"] for r in rows], max_len)
    n = len(rows)
    return {
        B.PIXEL_VALUES: torch.from_numpy(to_pixel_values(np.stack(canvases))),
        B.INPUT_IDS: torch.from_numpy(ids), B.ATTENTION_MASK: torch.from_numpy(mask),
        B.BOXES: torch.from_numpy(np.stack(boxes)), B.HAS_BOX: torch.ones(n), B.BOX_WEIGHT: torch.ones(n),
        B.ALT_BOXES: torch.zeros(n, 1, 4), B.ALT_MASK: torch.zeros(n, 1),
        B.ITEM_KEY: torch.from_numpy(B.stable_keys(r["item_id"] for r in rows)),
        B.IMAGE_KEY: torch.from_numpy(B.stable_keys(r["image_id"] for r in rows)),
        B.PAIR_KEY: torch.from_numpy(B.stable_keys(r["pair_id"] for r in rows)),
        B.ORIG_SIZE: torch.tensor(sizes, dtype=torch.float32),
    }
