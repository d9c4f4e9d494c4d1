"""Image decode, letterbox resize and exact box mapping between the original frame and the
model's square input.

Letterboxing keeps the aspect ratio: the image is scaled by ``s = S / max(w, h)`` and pasted
at ``(pad_x, pad_y)`` on an ``S x S`` grey canvas. A box maps forward as ``x' = x * s + pad_x``
and back as ``x = (x' - pad_x) / s``, so the round trip is exact up to float error, and IoU is
the same in both frames (a uniform scale plus a shift).
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .batch import IMAGE_MEAN, IMAGE_STD

PAD_VALUE = 127


@dataclass(frozen=True)
class Letterbox:
    """How an original ``width x height`` frame sits inside the ``size x size`` model input."""

    width: float
    height: float
    size: int

    @property
    def scale(self) -> float:
        return self.size / max(self.width, self.height)

    @property
    def pad(self) -> tuple[float, float]:
        s = self.scale
        return (self.size - self.width * s) / 2.0, (self.size - self.height * s) / 2.0


def decode_image(data: bytes) -> Image.Image:
    """Decode JPEG/PNG bytes to an RGB PIL image (raises ``PIL.UnidentifiedImageError`` / ``OSError``)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB") if img.mode != "RGB" else img


def letterbox_image(img: Image.Image, size: int) -> tuple[np.ndarray, Letterbox]:
    """Resize ``img`` into a ``size x size`` canvas keeping its aspect ratio.

    Returns ``(uint8 [size, size, 3], Letterbox)``. The pasted region is rounded to whole
    pixels; the returned geometry uses the exact (unrounded) scale and padding, which is
    what box mapping needs (the rounding error is below half a pixel).
    """
    lb = Letterbox(float(img.width), float(img.height), int(size))
    s = lb.scale
    new_w, new_h = max(1, round(img.width * s)), max(1, round(img.height * s))
    resized = img.resize((new_w, new_h), Image.BILINEAR)
    canvas = np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
    ox, oy = (size - new_w) // 2, (size - new_h) // 2
    canvas[oy:oy + new_h, ox:ox + new_w] = np.asarray(resized, dtype=np.uint8)
    return canvas, lb


def xyxy_pixels_to_letterbox_cxcywh(boxes: np.ndarray, lb: Letterbox) -> np.ndarray:
    """Boxes ``[..., 4]`` (x1, y1, x2, y2 in original pixels) -> ``[..., 4]`` (cx, cy, w, h) in [0, 1]
    of the letterboxed square."""
    boxes = np.asarray(boxes, dtype=np.float64)
    s = lb.scale
    px, py = lb.pad
    x1 = boxes[..., 0] * s + px
    y1 = boxes[..., 1] * s + py
    x2 = boxes[..., 2] * s + px
    y2 = boxes[..., 3] * s + py
    out = np.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=-1) / lb.size
    return out.astype(np.float32)


def letterbox_cxcywh_to_xyxy_pixels(boxes: np.ndarray, lb: Letterbox) -> np.ndarray:
    """Inverse of :func:`xyxy_pixels_to_letterbox_cxcywh`, clipped to the original frame."""
    boxes = np.asarray(boxes, dtype=np.float64) * lb.size
    s = lb.scale
    px, py = lb.pad
    cx, cy, w, h = boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3]
    x1 = ((cx - w / 2) - px) / s
    y1 = ((cy - h / 2) - py) / s
    x2 = ((cx + w / 2) - px) / s
    y2 = ((cy + h / 2) - py) / s
    out = np.stack([
        np.clip(x1, 0, lb.width), np.clip(y1, 0, lb.height),
        np.clip(x2, 0, lb.width), np.clip(y2, 0, lb.height),
    ], axis=-1)
    return out.astype(np.float32)


def to_pixel_values(canvases: np.ndarray) -> np.ndarray:
    """uint8 ``[B, S, S, 3]`` (or one ``[S, S, 3]``) -> float32 ``[B, 3, S, S]`` normalised for the model."""
    arr = np.asarray(canvases, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[None]
    arr = arr / 255.0
    mean = np.asarray(IMAGE_MEAN, dtype=np.float32)
    std = np.asarray(IMAGE_STD, dtype=np.float32)
    arr = (arr - mean) / std
    return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))


def preprocess_pil(images: list[Image.Image], size: int) -> tuple[np.ndarray, list[Letterbox]]:
    """PIL images -> (float32 ``[B, 3, S, S]``, letterbox geometry per image), for inference."""
    canvases, boxes = [], []
    for img in images:
        canvas, lb = letterbox_image(img.convert("RGB") if img.mode != "RGB" else img, size)
        canvases.append(canvas)
        boxes.append(lb)
    return to_pixel_values(np.stack(canvases)), boxes
