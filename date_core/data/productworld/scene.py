"""Scene pieces: backgrounds (studio / room), the presenter, product placement and the camera
degradations of stream frames. All randomness comes from the ``numpy.random.Generator`` passed
in, so a scene is a pure function of its RNG.
"""
from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .config import DomainStyle

Box = tuple[float, float, float, float]

_SKIN = ((241, 194, 160), (224, 172, 128), (198, 134, 90), (141, 85, 50), (250, 215, 190))
_HAIR = ((30, 22, 18), (70, 45, 25), (150, 100, 50), (20, 20, 20), (200, 170, 110))
#: Colour casts of stream lighting: warm tungsten, cool daylight LED, green fluorescent, magenta.
_CASTS = ((255, 170, 95), (120, 165, 255), (150, 255, 150), (255, 130, 220))


def _muted(rng: np.random.Generator, lo: int, hi: int, grey_mix: float) -> tuple[int, int, int]:
    """A random colour pulled towards grey (background things should not look like products)."""
    c = rng.integers(lo, hi, size=3).astype(np.float32)
    c = (1 - grey_mix) * c + grey_mix * c.mean()
    return tuple(int(v) for v in c)


def _gradient(w: int, h: int, top: tuple[int, ...], bottom: tuple[int, ...]) -> np.ndarray:
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    col = (1 - t) * np.asarray(top, np.float32) + t * np.asarray(bottom, np.float32)
    return np.broadcast_to(col, (h, w, 3))


def studio_background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Catalogue backdrop: a light pastel, plain or vertical gradient."""
    top = _muted(rng, 215, 252, 0.6)
    if rng.random() < 0.5:
        return Image.new("RGB", (w, h), top)
    bottom = tuple(int(v * rng.uniform(0.82, 0.95)) for v in top)
    return Image.fromarray(_gradient(w, h, top, bottom).astype(np.uint8), "RGB")


@lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """float32 [512, 512, 3] standard normal noise, fixed (seed 0). Frames take random crops of
    it: drawing fresh per-pixel normals dominated the render time, and a crop at an
    RNG-chosen offset is just as deterministic per image."""
    return np.random.default_rng(0).standard_normal((512, 512, 3), dtype=np.float32)


def noise_crop(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """float32 [h, w, 3] standard normal noise (a random crop of the bank, random sign)."""
    bank = _noise_bank()
    if h > bank.shape[0] or w > bank.shape[1]:
        return rng.standard_normal((h, w, 3), dtype=np.float32)
    y = int(rng.integers(0, bank.shape[0] - h + 1))
    x = int(rng.integers(0, bank.shape[1] - w + 1))
    crop = bank[y:y + h, x:x + w]
    return crop if rng.random() < 0.5 else -crop


def room_background(rng: np.random.Generator, style: DomainStyle) -> tuple[Image.Image, float]:
    """Stream room: blotchy wall, shelves with clutter, a table. Returns (image, table top y)."""
    w, h = style.width, style.height
    wall = np.asarray(_muted(rng, 90, 220, 0.5), np.float32)
    # The wall is built at 1/8 resolution and upsampled: smooth blotches for free.
    sh, sw = max(2, h // 8), max(2, w // 8)
    arr = _gradient(sw, sh, tuple(wall), tuple(wall * rng.uniform(0.7, 0.95))).copy()
    if style.texture > 0:
        arr += style.texture * 1.5 * rng.standard_normal((sh, sw, 1), dtype=np.float32)
    small = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    img = small.resize((w, h), Image.BILINEAR)
    d = ImageDraw.Draw(img)
    table_y = float(rng.uniform(0.62, 0.74) * h)
    n_shelves = int(rng.integers(0, 3))
    shelf_ys = sorted(rng.uniform(0.15, 0.55, size=n_shelves) * h)
    shelf_col = _muted(rng, 60, 160, 0.4)
    for y in shelf_ys:
        d.rectangle([0, y, w, y + max(2, h // 45)], fill=shelf_col)
    n_clutter = int(rng.integers(style.clutter[0], style.clutter[1] + 1))
    for _ in range(n_clutter):
        # Clutter stands on a shelf or the table, or hangs on the wall: boxes, books, pots.
        sz = rng.uniform(0.06, 0.2) * h
        cw, ch = sz * rng.uniform(0.4, 1.6), sz * rng.uniform(0.6, 1.4)
        anchors = list(shelf_ys) + [table_y]
        y2 = anchors[int(rng.integers(len(anchors)))] if rng.random() < 0.7 else rng.uniform(ch, table_y)
        x1 = rng.uniform(-0.3 * cw, w - 0.7 * cw)
        col = _muted(rng, 40, 230, float(rng.uniform(0.3, 0.7)))
        shape = int(rng.integers(3))
        if shape == 0:
            d.rectangle([x1, y2 - ch, x1 + cw, y2], fill=col)
        elif shape == 1:
            d.ellipse([x1, y2 - ch, x1 + cw, y2], fill=col)
        else:
            d.polygon([(x1, y2), (x1 + cw / 2, y2 - ch), (x1 + cw, y2)], fill=col)
    table_col = _muted(rng, 70, 200, 0.35)
    d.rectangle([0, table_y, w, h], fill=table_col)
    edge = tuple(int(c * 0.7) for c in table_col)
    d.rectangle([0, table_y, w, table_y + max(2, h // 60)], fill=edge)
    return img, table_y


def draw_presenter(img: Image.Image, rng: np.random.Generator, table_y: float) -> tuple[float, float, tuple]:
    """A stylised presenter behind the table. Returns (hands x, hands y, skin colour)."""
    w, h = img.size
    d = ImageDraw.Draw(img)
    cx = float(rng.uniform(0.3, 0.7) * w)
    r = 0.11 * h
    head_y = float(rng.uniform(0.2, 0.3) * h)
    skin = _SKIN[int(rng.integers(len(_SKIN)))]
    hair = _HAIR[int(rng.integers(len(_HAIR)))]
    cloth = _muted(rng, 30, 200, 0.45)
    half = 0.24 * h
    d.rounded_rectangle([cx - half, head_y + r * 1.1, cx + half, h + 5], radius=int(0.08 * h), fill=cloth)
    d.rectangle([cx - 0.3 * r, head_y + 0.8 * r, cx + 0.3 * r, head_y + 1.3 * r], fill=skin)
    d.ellipse([cx - 1.15 * r, head_y - 1.15 * r, cx + 1.15 * r, head_y + 1.35 * r], fill=hair)
    d.ellipse([cx - r, head_y - r, cx + r, head_y + r], fill=skin)
    hands_y = min(table_y - 0.05 * h, head_y + 0.42 * h)
    arm_w = max(3, int(0.06 * h))
    for sgn in (-1, 1):
        d.line([(cx + sgn * half * 0.9, head_y + 1.4 * r), (cx + sgn * 0.55 * half, hands_y)],
               fill=cloth, width=arm_w)
    return cx, float(hands_y), skin


def draw_hands(img: Image.Image, box: Box, skin: tuple) -> None:
    """Two hands over the lower corners of a held product (it partly occludes the product)."""
    d = ImageDraw.Draw(img)
    x1, y1, x2, y2 = box
    r = max(2.0, 0.045 * img.size[1])
    for x in (x1, x2):
        d.ellipse([x - r, y2 - 2.5 * r, x + r, y2 - 0.5 * r], fill=skin)


def draw_overlay(img: Image.Image, rng: np.random.Generator) -> None:
    """Stream UI: a LIVE badge and viewer counter, sometimes a comment bubble."""
    w, h = img.size
    d = ImageDraw.Draw(img)
    bh = max(8, h // 16)
    d.rounded_rectangle([4, 4, 4 + 3.2 * bh, 4 + bh], radius=2, fill=(225, 30, 45))
    d.text((6, 4 + bh * 0.1), "LIVE", fill=(255, 255, 255))
    d.rounded_rectangle([8 + 3.2 * bh, 4, 8 + 6 * bh, 4 + bh], radius=2, fill=(40, 40, 40))
    if rng.random() < 0.5:
        y = h - bh * float(rng.uniform(1.5, 3.0))
        d.rounded_rectangle([4, y, 4 + rng.uniform(0.2, 0.4) * w, y + bh], radius=3, fill=(55, 55, 60))


def overlap(a: Box, b: Box) -> float:
    """Intersection over the smaller box's area."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    small = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / small


def place(rng: np.random.Generator, size: tuple[int, int], frame: tuple[int, int],
          placed: list[Box], floor: tuple[float, float] | None,
          tries: int = 30) -> tuple[tuple[int, int], float]:
    """Top-left corner for a ``size`` product inside ``frame`` (which it must fit), and its worst
    overlap with the ``placed`` boxes: the best of ``tries`` random spots, stopping at the first
    free one. ``floor`` = (lo, hi) range for the product's bottom edge (standing on a table)."""
    (pw, ph), (w, h) = size, frame
    best, best_score = (0, 0), float("inf")
    for _ in range(tries):
        x = int(rng.integers(0, w - pw + 1))
        if floor is None:
            y = int(rng.integers(0, h - ph + 1))
        else:
            y = min(max(int(rng.uniform(*floor) - ph), 0), h - ph)
        cand = (x, y, x + pw, y + ph)
        score = max((overlap(cand, b) for b in placed), default=0.0)
        if score < best_score:
            best, best_score = (x, y), score
        if score == 0.0:
            break
    return best, best_score


def _blur(img: Image.Image, radius: float) -> Image.Image:
    """Gaussian blur; small radii use a 3x3 kernel (several times faster than GaussianBlur and
    visually the same below one pixel)."""
    if radius <= 0.05:
        return img
    if radius > 1.0:
        return img.filter(ImageFilter.GaussianBlur(radius))
    g = float(np.exp(-1.0 / (2.0 * radius * radius)))
    k = np.outer([g, 1.0, g], [g, 1.0, g]).ravel()
    return img.filter(ImageFilter.Kernel((3, 3), k.tolist(), scale=float(k.sum())))


def degrade(img: Image.Image, rng: np.random.Generator, style: DomainStyle) -> Image.Image:
    """Camera pipeline of a stream: blur, colour cast, exposure, sensor noise (JPEG is separate)."""
    img = _blur(img, float(rng.uniform(*style.blur)))
    cast = float(rng.uniform(0.0, style.colour_cast))
    gain = float(rng.uniform(*style.brightness))
    sigma = float(rng.uniform(0.0, style.noise))
    if cast <= 0 and gain == 1.0 and sigma <= 0:
        return img
    arr = np.asarray(img, dtype=np.float32)
    tint = np.asarray(_CASTS[int(rng.integers(len(_CASTS)))], np.float32)
    arr *= gain * ((1 - cast) + cast * tint / tint.mean())
    if sigma > 0:
        arr += sigma * noise_crop(rng, arr.shape[0], arr.shape[1])
    np.clip(arr, 0, 255, out=arr)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()
