"""Drawing one product: a category silhouette (PIL ``ImageDraw`` primitives on a mask), filled
with the item's colour and pattern and shaded by its finish (numpy, vectorised).

Every silhouette is described in unit coordinates of its own box, so it scales to any size;
the returned mask is cropped to the drawn pixels, which makes the product's box tight.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .catalogue import COLOURS, Item

Draw = ImageDraw.ImageDraw
_DARK = (42, 42, 48)
_LIGHT = (235, 235, 228)


def _sc(w: int, h: int, box: tuple[float, float, float, float]) -> list[float]:
    """Unit box -> pixel box inside a ``w x h`` canvas."""
    x1, y1, x2, y2 = box
    return [x1 * (w - 1), y1 * (h - 1), x2 * (w - 1), y2 * (h - 1)]


def _poly(w: int, h: int, pts: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(x * (w - 1), y * (h - 1)) for x, y in pts]


# Each silhouette: draw(mask_draw, w, h) fills with 255; detail(rgb_draw, w, h) adds parts that
# do not carry the item's colour (soles, screens, stems); both in unit coordinates.

def _mug(d: Draw, w: int, h: int) -> None:
    d.rounded_rectangle(_sc(w, h, (0.0, 0.04, 0.74, 1.0)), radius=max(1, int(0.08 * w)), fill=255)
    d.ellipse(_sc(w, h, (0.52, 0.22, 1.0, 0.74)), outline=255, width=max(2, int(0.1 * w)))


def _mug_detail(d: Draw, w: int, h: int) -> None:
    d.line(_sc(w, h, (0.02, 0.06, 0.72, 0.06)), fill=_DARK, width=max(1, h // 30))


def _bottle(d: Draw, w: int, h: int) -> None:
    d.rectangle(_sc(w, h, (0.34, 0.0, 0.66, 0.1)), fill=255)
    d.rectangle(_sc(w, h, (0.38, 0.08, 0.62, 0.24)), fill=255)
    d.polygon(_poly(w, h, [(0.38, 0.22), (0.62, 0.22), (1.0, 0.38), (0.0, 0.38)]), fill=255)
    d.rounded_rectangle(_sc(w, h, (0.0, 0.36, 1.0, 1.0)), radius=max(1, int(0.14 * w)), fill=255)


def _bottle_detail(d: Draw, w: int, h: int) -> None:
    d.rectangle(_sc(w, h, (0.34, 0.0, 0.66, 0.1)), fill=_DARK)


def _shoe(d: Draw, w: int, h: int) -> None:
    d.polygon(_poly(w, h, [(0.0, 0.5), (0.04, 0.2), (0.32, 0.0), (0.5, 0.04), (0.58, 0.34),
                           (0.9, 0.5), (1.0, 0.78), (0.0, 0.8)]), fill=255)
    d.rounded_rectangle(_sc(w, h, (0.0, 0.74, 1.0, 1.0)), radius=max(1, int(0.1 * h)), fill=255)


def _shoe_detail(d: Draw, w: int, h: int) -> None:
    d.rounded_rectangle(_sc(w, h, (0.0, 0.78, 1.0, 1.0)), radius=max(1, int(0.08 * h)), fill=_LIGHT)


def _bag(d: Draw, w: int, h: int) -> None:
    d.ellipse(_sc(w, h, (0.24, 0.0, 0.76, 0.6)), outline=255, width=max(2, int(0.08 * w)))
    d.polygon(_poly(w, h, [(0.1, 0.32), (0.9, 0.32), (1.0, 1.0), (0.0, 1.0)]), fill=255)


def _bag_detail(d: Draw, w: int, h: int) -> None:
    d.rectangle(_sc(w, h, (0.44, 0.4, 0.56, 0.5)), fill=_DARK)


def _lamp(d: Draw, w: int, h: int) -> None:
    d.polygon(_poly(w, h, [(0.24, 0.0), (0.76, 0.0), (1.0, 0.42), (0.0, 0.42)]), fill=255)
    d.rectangle(_sc(w, h, (0.43, 0.4, 0.57, 0.92)), fill=255)
    d.ellipse(_sc(w, h, (0.12, 0.86, 0.88, 1.0)), fill=255)


def _lamp_detail(d: Draw, w: int, h: int) -> None:
    d.rectangle(_sc(w, h, (0.43, 0.43, 0.57, 0.92)), fill=_DARK)
    d.ellipse(_sc(w, h, (0.12, 0.86, 0.88, 1.0)), fill=_DARK)


def _hat(d: Draw, w: int, h: int) -> None:
    d.ellipse(_sc(w, h, (0.0, 0.58, 1.0, 1.0)), fill=255)
    d.rounded_rectangle(_sc(w, h, (0.2, 0.0, 0.8, 0.8)), radius=max(1, int(0.14 * w)), fill=255)


def _hat_detail(d: Draw, w: int, h: int) -> None:
    d.rectangle(_sc(w, h, (0.2, 0.56, 0.8, 0.68)), fill=_DARK)


def _phone(d: Draw, w: int, h: int) -> None:
    d.rounded_rectangle(_sc(w, h, (0.0, 0.0, 1.0, 1.0)), radius=max(1, int(0.16 * w)), fill=255)


def _phone_detail(d: Draw, w: int, h: int) -> None:
    d.rounded_rectangle(_sc(w, h, (0.1, 0.04, 0.48, 0.22)), radius=max(1, int(0.06 * w)), fill=_DARK)


def _watch(d: Draw, w: int, h: int) -> None:
    d.rectangle(_sc(w, h, (0.26, 0.0, 0.74, 1.0)), fill=255)
    d.ellipse(_sc(w, h, (0.0, 0.5 - 0.5 * w / h, 1.0, 0.5 + 0.5 * w / h)), fill=255)


def _watch_detail(d: Draw, w: int, h: int) -> None:
    r = 0.32 * w / h
    d.ellipse(_sc(w, h, (0.18, 0.5 - r, 0.82, 0.5 + r)), fill=_LIGHT)
    d.line(_sc(w, h, (0.5, 0.5, 0.5, 0.5 - 0.7 * r)), fill=_DARK, width=max(1, w // 14))


def _tshirt(d: Draw, w: int, h: int) -> None:
    d.polygon(_poly(w, h, [(0.3, 0.0), (0.42, 0.06), (0.58, 0.06), (0.7, 0.0), (1.0, 0.2),
                           (0.88, 0.42), (0.78, 0.35), (0.78, 1.0), (0.22, 1.0), (0.22, 0.35),
                           (0.12, 0.42), (0.0, 0.2)]), fill=255)


def _tshirt_detail(d: Draw, w: int, h: int) -> None:
    d.arc(_sc(w, h, (0.36, -0.1, 0.64, 0.14)), 0, 180, fill=_DARK, width=max(1, h // 25))


def _chair(d: Draw, w: int, h: int) -> None:
    d.rounded_rectangle(_sc(w, h, (0.1, 0.0, 0.9, 0.46)), radius=max(1, int(0.1 * w)), fill=255)
    d.rectangle(_sc(w, h, (0.0, 0.44, 1.0, 0.6)), fill=255)
    d.rectangle(_sc(w, h, (0.04, 0.58, 0.18, 1.0)), fill=255)
    d.rectangle(_sc(w, h, (0.82, 0.58, 0.96, 1.0)), fill=255)


def _chair_detail(d: Draw, w: int, h: int) -> None:
    d.rectangle(_sc(w, h, (0.04, 0.62, 0.18, 1.0)), fill=_DARK)
    d.rectangle(_sc(w, h, (0.82, 0.62, 0.96, 1.0)), fill=_DARK)


def _vase(d: Draw, w: int, h: int) -> None:
    d.rectangle(_sc(w, h, (0.26, 0.0, 0.74, 0.06)), fill=255)
    d.rectangle(_sc(w, h, (0.33, 0.04, 0.67, 0.3)), fill=255)
    d.ellipse(_sc(w, h, (0.0, 0.2, 1.0, 1.0)), fill=255)


def _headphones(d: Draw, w: int, h: int) -> None:
    d.arc(_sc(w, h, (0.08, 0.0, 0.92, 0.9)), 180, 360, fill=255, width=max(2, int(0.1 * w)))
    d.rounded_rectangle(_sc(w, h, (0.0, 0.4, 0.3, 1.0)), radius=max(1, int(0.08 * w)), fill=255)
    d.rounded_rectangle(_sc(w, h, (0.7, 0.4, 1.0, 1.0)), radius=max(1, int(0.08 * w)), fill=255)


def _headphones_detail(d: Draw, w: int, h: int) -> None:
    d.rectangle(_sc(w, h, (0.22, 0.5, 0.3, 0.9)), fill=_DARK)
    d.rectangle(_sc(w, h, (0.7, 0.5, 0.78, 0.9)), fill=_DARK)


def _none(d: Draw, w: int, h: int) -> None:
    return None


#: category -> (aspect h/w, silhouette, detail)
SILHOUETTES: dict[str, tuple[float, Callable, Callable]] = {
    "mug": (0.85, _mug, _mug_detail),
    "bottle": (2.4, _bottle, _bottle_detail),
    "shoe": (0.5, _shoe, _shoe_detail),
    "bag": (1.0, _bag, _bag_detail),
    "lamp": (1.6, _lamp, _lamp_detail),
    "hat": (0.62, _hat, _hat_detail),
    "phone": (1.9, _phone, _phone_detail),
    "watch": (2.2, _watch, _watch_detail),
    "tshirt": (0.95, _tshirt, _tshirt_detail),
    "chair": (1.4, _chair, _chair_detail),
    "vase": (1.45, _vase, _none),
    "headphones": (1.0, _headphones, _headphones_detail),
}


def product_size(category: str, longest: float) -> tuple[int, int]:
    """(w, h) in pixels of a ``category`` product whose longest side is ``longest`` px."""
    aspect = SILHOUETTES[category][0]
    if aspect >= 1.0:
        return max(8, round(longest / aspect)), max(8, round(longest))
    return max(8, round(longest)), max(8, round(longest * aspect))


def _secondary(rgb: tuple[int, int, int]) -> np.ndarray:
    """Pattern colour: white on dark items, near-black on light ones (keeps patterns visible)."""
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return np.asarray((245, 245, 240) if lum < 140 else (40, 40, 52), dtype=np.float32)


def _surface(item: Item, w: int, h: int, longest: int) -> np.ndarray:
    """float32 [h, w, 3] colour + pattern + finish shading of ``item``."""
    base = np.asarray(COLOURS[item.colour], dtype=np.float32)
    sec = _secondary(COLOURS[item.colour])
    # Period relative to the product size: about 5 repeats along the longest side, so the
    # pattern survives downscaling to the model input as long as the product does.
    p = max(4.0, longest / 5.0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if item.pattern == "plain":
        on = None
    elif item.pattern == "striped":
        on = (yy % p) < 0.38 * p
    elif item.pattern == "dotted":
        on = ((xx % p) - p / 2) ** 2 + ((yy % p) - p / 2) ** 2 < (0.27 * p) ** 2
    elif item.pattern == "checked":
        on = ((xx // (0.8 * p) + yy // (0.8 * p)) % 2) == 1
        sec = 0.55 * sec + 0.45 * base  # half-tone checks keep the item's colour dominant
    elif item.pattern == "zigzag":
        tri = np.abs((xx / p) % 2.0 - 1.0) * (0.5 * p)
        on = ((yy + tri) % p) < 0.36 * p
    else:
        raise ValueError(f"unknown pattern {item.pattern!r}")
    surf = np.empty((h, w, 3), dtype=np.float32)
    surf[:] = base
    if on is not None:
        surf[on] = sec
    xs = np.linspace(0.0, 1.0, w, dtype=np.float32)
    if item.finish == "glossy":
        streak = np.exp(-((xs - 0.27) / 0.06) ** 2)[None, :, None]
        surf += streak * (255.0 - surf) * 0.8
    elif item.finish == "metallic":
        shade = (0.55 + 0.75 * np.exp(-((xs - 0.38) / 0.22) ** 2))[None, :, None]
        grey = surf.mean(axis=2, keepdims=True)
        surf = (0.7 * surf + 0.3 * grey) * shade
    elif item.finish != "matte":
        raise ValueError(f"unknown finish {item.finish!r}")
    return surf


def draw_product(item: Item, longest: float) -> tuple[Image.Image, Image.Image, Image.Image]:
    """Render ``item`` with its longest side ``longest`` pixels.

    Returns ``(rgb, mask, outline_mask)``, all the same size and cropped to the silhouette:
    paste a dark colour through ``outline_mask`` then ``rgb`` through ``mask``. Deterministic
    (no randomness: the same item at the same size always looks the same).
    """
    if item.category not in SILHOUETTES:
        raise ValueError(f"unknown category {item.category!r}")
    _, silhouette, detail = SILHOUETTES[item.category]
    w, h = product_size(item.category, longest)
    mask = Image.new("L", (w + 2, h + 2), 0)
    # Draw one pixel in from the border so the 1-px outline has room.
    inner = Image.new("L", (w, h), 0)
    silhouette(ImageDraw.Draw(inner), w, h)
    mask.paste(inner, (1, 1))
    surf = np.zeros((h + 2, w + 2, 3), dtype=np.float32)
    surf[1:-1, 1:-1] = _surface(item, w, h, max(w, h))
    rgb = Image.fromarray(np.clip(surf, 0, 255).astype(np.uint8), "RGB")
    detail_layer = Image.new("RGB", (w, h))
    detail_layer.paste(rgb.crop((1, 1, w + 1, h + 1)))
    detail(ImageDraw.Draw(detail_layer), w, h)
    rgb.paste(detail_layer, (1, 1))
    outline = mask.filter(ImageFilter.MaxFilter(3))
    bbox = outline.getbbox()
    return rgb.crop(bbox), mask.crop(bbox), outline.crop(bbox)
