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

:class:`Focus` is the one per-sample view: a zoom about each image's own point (the teacher's
first box centre). It has no config name; ``adapt.focus_zoom`` puts it before every view.
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
        one = pixel_values.new_ones(pixel_values.shape[0])
        return affine_resample(pixel_values, self.a * one, self.bx * one, self.by * one)

    def boxes_to_view(self, boxes: torch.Tensor) -> torch.Tensor:
        return map_boxes(boxes, self.a, self.bx, self.by)

    def boxes_to_original(self, boxes: torch.Tensor) -> torch.Tensor:
        return unmap_boxes(boxes, self.a, self.bx, self.by)


class Scale(Affine):
    """Zoom about the centre by ``f``: ``x' = 0.5 + f * (x - 0.5)``."""

    def __init__(self, factor: float) -> None:
        super().__init__(factor, 0.5 * (1.0 - factor), 0.5 * (1.0 - factor), f"scale_{factor:g}")


class Shift(Affine):
    """Translate by ``(dx, dy)`` (fractions of the side): ``x' = x + dx``."""

    def __init__(self, dx: float, dy: float) -> None:
        super().__init__(1.0, dx, dy, f"shift_{dx:g}_{dy:g}")


class Focus(View):
    """Zoom by ``zoom`` about a point of each image (``centres [N, 2]``, x and y in [0, 1]), which
    lands at the middle of the view: ``x' = zoom * (x - c) + 0.5``, per sample.

    The pseudo box generator's zoom-in: a product that the target shows smaller than the source
    did is seen at about the source's scale, where the size head was trained (``adapt.focus_zoom``,
    :func:`~date_core.adapt.pseudo.predict_views`). The centres are the model's own first guess."""

    def __init__(self, zoom: float, centres: torch.Tensor) -> None:
        if not zoom > 0:
            raise ValueError(f"focus zoom must be > 0, got {zoom}")
        if centres.ndim != 2 or centres.shape[1] != 2:
            raise ValueError(f"focus centres must be [N, 2], got shape {tuple(centres.shape)}")
        c = centres.detach().float().clamp(0.0, 1.0)
        self.a = torch.full_like(c[:, 0], float(zoom))
        self.bx, self.by = 0.5 - self.a * c[:, 0], 0.5 - self.a * c[:, 1]
        self.name = f"focus_{zoom:g}"

    def apply(self, pixel_values: torch.Tensor) -> torch.Tensor:
        _check_pixels(pixel_values)
        if pixel_values.shape[0] != self.a.shape[0]:
            raise ValueError(f"{self.name}: {self.a.shape[0]} centres for {pixel_values.shape[0]} images")
        dev = pixel_values.device
        return affine_resample(pixel_values, self.a.to(dev), self.bx.to(dev), self.by.to(dev))

    def boxes_to_view(self, boxes: torch.Tensor) -> torch.Tensor:
        return map_boxes(boxes, *self._per_sample(boxes))

    def boxes_to_original(self, boxes: torch.Tensor) -> torch.Tensor:
        return unmap_boxes(boxes, *self._per_sample(boxes))

    def _per_sample(self, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The zoom and offsets shaped to broadcast over ``boxes [N, ..., 4]``."""
        shape = (-1,) + (1,) * (boxes.dim() - 2)
        return tuple(v.to(boxes.device, boxes.dtype).view(shape) for v in (self.a, self.bx, self.by))


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


def affine_resample(pixels: torch.Tensor, a: torch.Tensor, bx: torch.Tensor, by: torch.Tensor) -> torch.Tensor:
    """Resample ``pixels [B, 3, S, S]`` under the per-sample map ``x' = a x + bx``, ``y' = a y + by``
    of the unit square (``a, bx, by [B]``); what comes from outside the image is the pad grey."""
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    # affine_grid maps output to input coordinates in [-1, 1] (u = 2x - 1): x = (x' - b) / a
    # becomes u = u'/a + (1 - a - 2b)/a.
    theta = torch.stack([torch.stack([one / a, zero, (1 - a - 2 * bx) / a], -1),
                         torch.stack([zero, one / a, (1 - a - 2 * by) / a], -1)], 1).to(pixels.dtype)
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    # grid_sample pads with 0; sample the offset from the pad grey so the padding is exactly grey.
    pad = pixels.new_tensor(PAD_NORMALISED).view(1, 3, 1, 1)
    return F.grid_sample(pixels - pad, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + pad


def map_boxes(boxes: torch.Tensor, a, bx, by) -> torch.Tensor:
    """Boxes ``[..., 4]`` cxcywh under ``x' = a x + bx`` (``a, bx, by``: numbers or tensors that
    broadcast over the leading dimensions)."""
    return torch.stack([a * boxes[..., 0] + bx, a * boxes[..., 1] + by, a * boxes[..., 2], a * boxes[..., 3]], dim=-1)


def unmap_boxes(boxes: torch.Tensor, a, bx, by) -> torch.Tensor:
    """The exact inverse of :func:`map_boxes`."""
    return torch.stack([(boxes[..., 0] - bx) / a, (boxes[..., 1] - by) / a, boxes[..., 2] / a, boxes[..., 3] / a], dim=-1)


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
    out = dict(batch)
    out["pixel_values"] = affine_resample(pixels, a, bx, by)

    def move(boxes: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (boxes.dim() - 2)
        moved = map_boxes(boxes, *(v.view(shape).to(boxes.dtype) for v in (a, bx, by)))
        return torch.where(boxes[..., 2:3] > 0, moved, boxes)  # empty (zero) slots stay empty

    for key in ("boxes", "alt_boxes"):
        if key in batch:
            out[key] = move(batch[key])
    return out
