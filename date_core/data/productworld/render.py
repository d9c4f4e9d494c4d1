"""Composing ProductWorld images and their contract rows.

Image ``index`` of ``domain`` under ``seed`` is a pure function of ``(seed, domain, index)``
and the config: its RNG is seeded from exactly that triple, so any batch split, worker or
machine produces byte-identical rows (the Ray Data glue relies on it).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from .catalogue import ATTRIBUTES, Item, attribute_values, catalogue
from .config import DomainStyle, ProductWorldConfig
from .queries import choose_mentions, matches, write_query
from .scene import (Box, degrade, draw_hands, draw_overlay, draw_presenter, encode_jpeg, place,
                    room_background, studio_background)
from .shapes import draw_product, product_size

_DEFAULT_CONFIG = ProductWorldConfig()


@dataclass
class Product:
    """One product in a rendered image; ``box`` is x1, y1, x2, y2 in pixels (tight, amodal)."""

    item: Item
    box: Box
    held: bool = False
    on_table: bool = False
    #: Longest side of the drawn silhouette in pixels (the box adds a 1-px outline).
    longest: float = 0.0


@dataclass
class Scene:
    """A rendered image with every product in it and the contract rows it yields."""

    domain: str
    image_id: str
    width: int
    height: int
    products: list[Product]
    rows: list[dict] = field(default_factory=list)


def scene_rng(seed: int, domain: str, index: int) -> np.random.Generator:
    """The RNG of one image, from ``(seed, domain, index)`` only."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed} index={index}")
    dom = int.from_bytes(hashlib.blake2b(domain.encode("utf-8"), digest_size=4).digest(), "little")
    return np.random.default_rng(np.random.SeedSequence([int(seed), dom, int(index)]))


def _random_item(rng: np.random.Generator) -> Item:
    items = catalogue()
    return items[int(rng.integers(len(items)))]


def _vary(rng: np.random.Generator, base: Item, keep: str) -> Item:
    """An item sharing ``base``'s ``keep`` attribute and differing from it somewhere else."""
    while True:
        values = {a: (base.attribute(a) if a == keep else
                      attribute_values(a)[int(rng.integers(len(attribute_values(a))))])
                  for a in ATTRIBUTES}
        item = Item(**values)
        if item != base:
            return item


def sample_items(rng: np.random.Generator, n: int, style: DomainStyle) -> list[Item]:
    """``n`` items; the first is the primary target, the others a mix of distractors that share
    its category or colour, identical copies, and unrelated items."""
    target = _random_item(rng)
    items = [target]
    for _ in range(n - 1):
        u = rng.random()
        if u < style.same_category_prob:
            items.append(_vary(rng, target, "category"))
        elif u < style.same_category_prob + style.same_colour_prob:
            items.append(_vary(rng, target, "colour"))
        elif u < style.same_category_prob + style.same_colour_prob + style.duplicate_prob:
            items.append(target)
        else:
            items.append(_random_item(rng))
    return items


def _n_products(rng: np.random.Generator, style: DomainStyle) -> int:
    lo, hi = style.n_products
    if style.n_products_weights is None:
        return int(rng.integers(lo, hi + 1))
    p = np.asarray(style.n_products_weights, dtype=np.float64)
    return lo + int(rng.choice(len(p), p=p / p.sum()))


def _layout(rng: np.random.Generator, items: list[Item], style: DomainStyle,
            table_y: float | None, hands: tuple[float, float] | None) -> list[Product]:
    """Sizes and positions. With ``hands``, one product is held there; with ``table_y``, most
    others stand on the table."""
    w, h = style.width, style.height
    held_idx = int(rng.integers(len(items))) if hands is not None and rng.random() < style.held_prob else -1
    products: list[Product | None] = [None] * len(items)
    placed: list[Box] = []
    order = ([held_idx] if held_idx >= 0 else []) + [i for i in range(len(items)) if i != held_idx]
    for i in order:
        item = items[i]
        scale = rng.uniform(*style.product_scale) * (style.target_scale_factor if i == 0 else 1.0)
        longest = scale * h
        on_table = table_y is not None and i != held_idx and rng.random() < 0.75
        floor = (table_y + 0.25 * (h - table_y), h) if on_table else None
        # (position, worst overlap, (w, h) of the box, longest side of the silhouette)
        best: tuple = (None, float("inf"), None, None)
        longest = min(longest, 0.97 * min(w, h))
        for _ in range(6):
            pw, ph = product_size(item.category, longest)
            pw, ph = pw + 2, ph + 2  # the drawn product carries a 1-px outline on each side
            if i == held_idx:
                hx, hy = hands
                pos = (int(np.clip(hx - pw / 2, 0, w - pw)), int(np.clip(hy - 0.6 * ph, 0, h - ph)))
                best = (pos, 0.0, (pw, ph), longest)
                break
            pos, score = place(rng, (pw, ph), (w, h), placed, floor)
            if score < best[1]:
                best = (pos, score, (pw, ph), longest)
            if score <= style.max_overlap:
                break
            longest *= 0.88  # crowded: shrink and retry rather than overlap heavily
        # If no try met max_overlap, the least-overlapping one is kept rather than drop a product.
        pos, _, (pw, ph), longest = best
        box = (float(pos[0]), float(pos[1]), float(pos[0] + pw), float(pos[1] + ph))
        placed.append(box)
        products[i] = Product(item, box, held=(i == held_idx), on_table=on_table, longest=longest)
    return products  # type: ignore[return-value]


def _paste_products(img: Image.Image, products: list[Product], shadow: bool,
                    skin: tuple | None) -> list[Product]:
    """Draw back to front (by bottom edge, held product last); the box becomes the drawn
    silhouette's tight box (the layout box is its upper bound)."""
    order = sorted(range(len(products)), key=lambda i: (products[i].held, products[i].box[3]))
    backdrop = img.copy() if shadow else None  # shadows take the backdrop's colour, not a product's
    for i in order:
        p = products[i]
        rgb, mask, outline = draw_product(p.item, p.longest)
        x, y = int(p.box[0]), int(p.box[1])
        if backdrop is not None:
            below = backdrop.getpixel((min(x, img.width - 1), min(y, img.height - 1)))
            shade = tuple(int(c * 0.8) for c in below)
            img.paste(shade, (x + 3, y + 3), outline)
        img.paste((34, 34, 38), (x, y), outline)
        img.paste(rgb, (x, y), mask)
        p.box = (float(x), float(y), float(min(x + mask.width, img.width)),
                 float(min(y + mask.height, img.height)))
        if p.held and skin is not None:
            draw_hands(img, p.box, skin)
    return products


def compose_image(rng: np.random.Generator, items: Sequence[Item],
                  style: DomainStyle) -> tuple[bytes, list[Product]]:
    """Draw ``items`` (in this order; the first gets ``style.target_scale_factor``) into one
    image of ``style``: background, presenter, layout, products, overlay, camera artefacts ->
    (JPEG bytes, the products with their drawn boxes, in the order of ``items``)."""
    skin, table_y, hands = None, None, None
    if style.background == "room":
        img, table_y = room_background(rng, style)
    else:
        img = studio_background(rng, style.width, style.height)
    if style.presenter:
        hx, hy, skin = draw_presenter(img, rng, table_y if table_y is not None else style.height)
        hands = (hx, hy)
    products = _paste_products(img, _layout(rng, list(items), style, table_y, hands), style.shadow, skin)
    if style.overlay:
        draw_overlay(img, rng)
    img = degrade(img, rng, style)
    quality = int(rng.integers(style.jpeg_quality[0], style.jpeg_quality[1] + 1))
    return encode_jpeg(img, quality), products


def render_scene(domain: str, index: int, seed: int,
                 config: ProductWorldConfig | None = None) -> Scene:
    """Render image ``index`` of ``domain`` and write its 1-2 query rows."""
    cfg = config or _DEFAULT_CONFIG
    style = cfg.style(domain)
    rng = scene_rng(seed, domain, index)
    items = sample_items(rng, _n_products(rng, style), style)
    data, products = compose_image(rng, items, style)

    image_id = f"{domain}-{seed}-{index}"
    scene = Scene(domain, image_id, style.width, style.height, products)
    targets = [0]
    others = [i for i, p in enumerate(products) if p.item != products[0].item]
    if others and rng.random() < style.second_query_prob:
        targets.append(others[int(rng.integers(len(others)))])
    for q, t in enumerate(targets):
        target = products[t]
        rest = [p.item for j, p in enumerate(products) if j != t]
        mentioned = choose_mentions(rng, target.item, rest, style.query_style)
        query = write_query(rng, target.item, mentioned, style.query_style,
                            held=target.held, on_table=target.on_table)
        alts = [list(p.box) for j, p in enumerate(products)
                if j != t and matches(p.item, target.item, mentioned)]
        scene.rows.append({
            "pair_id": f"{image_id}-{q}",
            "image_id": image_id,
            "image": data,
            "width": style.width,
            "height": style.height,
            "query": query,
            "box": list(target.box),
            "alt_boxes": alts,
            "domain": domain,
            "item_id": target.item.item_id,
        })
    return scene


def render_scenes(domain: str, indices: Sequence[int], seed: int,
                  config: ProductWorldConfig | None = None) -> list[Scene]:
    """:func:`render_scene` for each index (the blind baselines need every product's box)."""
    return [render_scene(domain, int(i), seed, config) for i in indices]


def render_images(domain: str, indices: Sequence[int], seed: int,
                  config: ProductWorldConfig | None = None) -> list[dict]:
    """Contract rows (no ``split``) of images ``indices`` of ``domain``: 1-2 rows per image.

    Each row: ``pair_id`` (``f"{domain}-{seed}-{index}-{q}"``), ``image_id``, ``image`` (JPEG
    bytes), ``width``, ``height``, ``query``, ``box`` [x1, y1, x2, y2] pixels, ``alt_boxes``
    (list of boxes of identical products), ``domain``, ``item_id``.
    """
    rows: list[dict] = []
    for scene in render_scenes(domain, indices, seed, config):
        rows.extend(scene.rows)
    return rows


def iter_rows(domain: str, n_images: int, seed: int,
              config: ProductWorldConfig | None = None, batch: int = 64) -> Iterator[dict]:
    """Rows of images ``0 .. n_images-1``, rendered ``batch`` images at a time."""
    for start in range(0, n_images, batch):
        yield from render_images(domain, range(start, min(n_images, start + batch)), seed, config)
