"""Augmented views for the pseudo box generator, with exact box mapping back.

A view transforms the batch's ``pixel_values`` ``[B, 3, S, S]`` (the letterboxed square,
normalised) and maps boxes predicted on the transformed image back to the original square.
All geometric views are affine maps of the unit square ``x' = a * x + b`` (per axis),
resampled with ``grid_sample(align_corners=False)``, whose coordinate convention (the grid
spans the pixels' outer edges) is exactly that of normalised box coordinates; so the image
and the box mapping agree, and the inverse box mapping is exact (a division, no rounding).

Names (the ``adapt.views`` config list): ``identity``, ``hflip``, ``scale_<f>`` (zoom about
the centre by ``f``: ``f < 1`` shrinks and pads, ``f > 1`` crops), ``shift_<d>`` or
``shift_<dx>_<dy>`` (translate by a fraction of the side, padding what comes in), and
compositions joined with ``+`` (``hflip+scale_0.9``: the flip first). Padding uses the
letterbox's grey (``imaging.PAD_VALUE``) so that a view looks like a letterboxed image.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.nn import functional as F

from ..batch import IMAGE_MEAN, IMAGE_STD
from ..imaging import PAD_VALUE

#: ``PAD_VALUE`` grey after normalisation, per channel ``[3]``.
PAD_NORMALISED = tuple((PAD_VALUE / 255.0 - m) / s for m, s in zip(IMAGE_MEAN, IMAGE_STD))


class View:
    """One augmented view. Subclasses implement :meth:`apply` and the two box maps."""

    name: str = "view"

    def apply(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` -> the transformed ``[B, 3, S, S]``."""
        raise NotImplementedError

    def boxes_to_view(self, boxes: torch.Tensor) -> torch.Tensor:
        """Boxes ``[..., 4]`` (cx, cy, w, h in [0, 1]) in the original square -> in the view."""
        raise NotImplementedError

    def boxes_to_original(self, boxes: torch.Tensor) -> torch.Tensor:
        """Boxes ``[..., 4]`` (cx, cy, w, h) predicted on the view -> the original square (exact inverse)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class Identity(View):
    name = "identity"

    def apply(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pixel_values

    def boxes_to_view(self, boxes: torch.Tensor) -> torch.Tensor:
        return boxes

    def boxes_to_original(self, boxes: torch.Tensor) -> torch.Tensor:
        return boxes


class HFlip(View):
    """Mirror left-right: ``cx -> 1 - cx`` (its own inverse)."""

    name = "hflip"

    def apply(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pixel_values.flip(-1)

    def boxes_to_view(self, boxes: torch.Tensor) -> torch.Tensor:
        return torch.cat([1.0 - boxes[..., :1], boxes[..., 1:]], dim=-1)

    def boxes_to_original(self, boxes: torch.Tensor) -> torch.Tensor:
        return self.boxes_to_view(boxes)


class Affine(View):
    """Axis-aligned affine view ``x' = a * x + bx``, ``y' = a * y + by`` of the unit square.

    ``a`` is the zoom (``> 0``), ``bx, by`` the offsets. Pixels that come from outside the
    original square are the pad grey.
    """

    def __init__(self, a: float, bx: float, by: float, name: str) -> None:
        if a <= 0:
            raise ValueError(f"view {name!r}: the zoom factor must be > 0, got {a}")
        self.a, self.bx, self.by, self.name = float(a), float(bx), float(by), name

    def apply(self, pixel_values: torch.Tensor) -> torch.Tensor:
        _check_pixels(pixel_values)
        b = pixel_values.shape[0]
        # affine_grid maps output to input coordinates in [-1, 1] (u = 2x - 1): x = (x' - b) / a
        # becomes u = u'/a + (1 - a - 2b)/a.
        theta = pixel_values.new_tensor([
            [1.0 / self.a, 0.0, (1.0 - self.a - 2.0 * self.bx) / self.a],
            [0.0, 1.0 / self.a, (1.0 - self.a - 2.0 * self.by) / self.a],
        ]).expand(b, 2, 3)
        grid = F.affine_grid(theta, list(pixel_values.shape), align_corners=False)
        # grid_sample pads with 0; sample the offset from the pad grey so the padding is exactly grey.
        pad = pixel_values.new_tensor(PAD_NORMALISED).view(1, 3, 1, 1)
        out = F.grid_sample(pixel_values - pad, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return out + pad

    def boxes_to_view(self, boxes: torch.Tensor) -> torch.Tensor:
        return torch.stack([
            self.a * boxes[..., 0] + self.bx, self.a * boxes[..., 1] + self.by,
            self.a * boxes[..., 2], self.a * boxes[..., 3],
        ], dim=-1)

    def boxes_to_original(self, boxes: torch.Tensor) -> torch.Tensor:
        return torch.stack([
            (boxes[..., 0] - self.bx) / self.a, (boxes[..., 1] - self.by) / self.a,
            boxes[..., 2] / self.a, boxes[..., 3] / self.a,
        ], dim=-1)


class Scale(Affine):
    """Zoom about the centre by ``f``: ``x' = 0.5 + f * (x - 0.5)``."""

    def __init__(self, factor: float) -> None:
        super().__init__(factor, 0.5 * (1.0 - factor), 0.5 * (1.0 - factor), f"scale_{factor:g}")


class Shift(Affine):
    """Translate by ``(dx, dy)`` (fractions of the side): ``x' = x + dx``."""

    def __init__(self, dx: float, dy: float) -> None:
        super().__init__(1.0, dx, dy, f"shift_{dx:g}_{dy:g}")


class Compose(View):
    """Views applied in order (images) with boxes mapped back in reverse order."""

    def __init__(self, views: Sequence[View]) -> None:
        if not views:
            raise ValueError("Compose needs at least one view")
        self.views = list(views)
        self.name = "+".join(v.name for v in self.views)

    def apply(self, pixel_values: torch.Tensor) -> torch.Tensor:
        for v in self.views:
            pixel_values = v.apply(pixel_values)
        return pixel_values

    def boxes_to_view(self, boxes: torch.Tensor) -> torch.Tensor:
        for v in self.views:
            boxes = v.boxes_to_view(boxes)
        return boxes

    def boxes_to_original(self, boxes: torch.Tensor) -> torch.Tensor:
        for v in reversed(self.views):
            boxes = v.boxes_to_original(boxes)
        return boxes


def _check_pixels(pixel_values: torch.Tensor) -> None:
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"views expect pixel_values [B, 3, S, S], got shape {tuple(pixel_values.shape)}")


def _parse_float(text: str, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"view {name!r}: {text!r} is not a number") from None


def build_view(name: str) -> View:
    """A view from its config name (see the module doc)."""
    name = name.strip()
    if "+" in name:
        return Compose([build_view(part) for part in name.split("+")])
    if name == "identity":
        return Identity()
    if name == "hflip":
        return HFlip()
    if name.startswith("scale_"):
        f = _parse_float(name[len("scale_"):], name)
        if not 0.25 <= f <= 4.0:
            raise ValueError(f"view {name!r}: scale factor must lie in [0.25, 4], got {f}")
        return Scale(f)
    if name.startswith("shift_"):
        parts = name[len("shift_"):].split("_")
        if len(parts) not in (1, 2):
            raise ValueError(f"view {name!r}: use shift_<d> or shift_<dx>_<dy>")
        dx = _parse_float(parts[0], name)
        dy = _parse_float(parts[-1], name)
        if max(abs(dx), abs(dy)) >= 0.5:
            raise ValueError(f"view {name!r}: a shift must be below half the side")
        return Shift(dx, dy)
    raise ValueError(f"unknown view {name!r}; use identity, hflip, scale_<f>, shift_<d>[_<dy>] or a '+' composition")


def build_views(names: Sequence[str]) -> list[View]:
    """Views from the ``adapt.views`` list; names must be unique."""
    if isinstance(names, str):
        raise TypeError("adapt.views must be a list of view names, not one string")
    views = [build_view(n) for n in names]
    if not views:
        raise ValueError("adapt.views is empty; the pseudo box generator needs at least one view")
    seen = [v.name for v in views]
    if len(set(seen)) != len(seen):
        raise ValueError(f"adapt.views has duplicates: {seen}")
    return views


def random_zoom_out(batch: dict, zoom: Sequence[float], prob: float, generator: torch.Generator | None = None) -> dict:
    """Training augmentation: shrink a random subset of the images into the square, each by its
    own factor ``a ~ U(zoom)`` at a random place (pad grey around), boxes mapped exactly.

    Products in live-stream frames are smaller than in catalogue photos (in ProductWorld about
    half); a seeker trained at one scale predicts boxes of that size, whose IoU with a half-size
    box is at most 0.25. ``batch``: tensors with ``pixel_values [B, 3, S, S]``, ``boxes [B, 4]``
    and optionally ``alt_boxes [B, M, 4]`` (cxcywh in [0, 1]; empty slots stay zero). Returns a
    new dict; ``prob = 0`` or ``zoom = (1, 1)`` returns the batch unchanged.
    """
    lo, hi = float(zoom[0]), float(zoom[1])
    if not 0.25 <= lo <= hi <= 1.0:
        raise ValueError(f"zoom-out range must satisfy 0.25 <= lo <= hi <= 1, got {list(zoom)}")
    pixels = batch["pixel_values"]
    if prob <= 0 or lo == 1.0:
        return batch
    _check_pixels(pixels)
    n = pixels.shape[0]
    dev = pixels.device
    u = torch.rand(n, 3, generator=generator).to(dev)
    active = u[:, 0] < prob
    a = torch.where(active, lo + (hi - lo) * u[:, 1], torch.ones_like(u[:, 1]))
    free = 1.0 - a
    bx, by = free * u[:, 2], free * torch.rand(n, generator=generator).to(dev)
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    # as Affine.apply, per sample: output u' -> input u = u'/a + (1 - a - 2b)/a
    theta = torch.stack([torch.stack([one / a, zero, (1 - a - 2 * bx) / a], -1),
                         torch.stack([zero, one / a, (1 - a - 2 * by) / a], -1)], 1).to(pixels.dtype)
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    pad = pixels.new_tensor(PAD_NORMALISED).view(1, 3, 1, 1)
    out = dict(batch)
    out["pixel_values"] = F.grid_sample(pixels - pad, grid, mode="bilinear", padding_mode="zeros",
                                        align_corners=False) + pad

    def move(boxes: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (boxes.dim() - 2)
        aa, xx, yy = a.view(shape).to(boxes.dtype), bx.view(shape).to(boxes.dtype), by.view(shape).to(boxes.dtype)
        moved = torch.stack([aa * boxes[..., 0] + xx, aa * boxes[..., 1] + yy, aa * boxes[..., 2], aa * boxes[..., 3]], -1)
        return torch.where(boxes[..., 2:3] > 0, moved, boxes)  # empty (zero) slots stay empty

    for key in ("boxes", "alt_boxes"):
        if key in batch:
            out[key] = move(batch[key])
    return out
