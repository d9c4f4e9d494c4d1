"""Augmented views: the image transform and the box mapping agree, and boxes map back exactly."""
from __future__ import annotations

import pytest
import torch

from date_core.adapt.views import PAD_NORMALISED, build_view, build_views
from date_core.batch import IMAGE_MEAN, IMAGE_STD
from date_core.imaging import PAD_VALUE, to_pixel_values

S = 64
VIEW_NAMES = ["identity", "hflip", "scale_0.5", "scale_0.75", "scale_2", "shift_0.125_-0.0625",
              "hflip+scale_0.5"]


def _painted(box_px: tuple[int, int, int, int]) -> torch.Tensor:
    """A [1, 3, S, S] image: pad-grey background with a white rectangle x1:x2, y1:y2 (pixels)."""
    import numpy as np

    canvas = np.full((S, S, 3), PAD_VALUE, dtype=np.uint8)
    x1, y1, x2, y2 = box_px
    canvas[y1:y2, x1:x2] = 255
    return torch.from_numpy(to_pixel_values(canvas))


def _extent_cxcywh(pixels: torch.Tensor) -> torch.Tensor:
    """The bright region's box (cx, cy, w, h in [0, 1]) from pixel extents."""
    bright = pixels[0, 0] > 0.5
    ys, xs = torch.nonzero(bright, as_tuple=True)
    x1, x2 = xs.min().item(), xs.max().item() + 1
    y1, y2 = ys.min().item(), ys.max().item() + 1
    return torch.tensor([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dtype=torch.float32) / S


def test_pad_value_is_the_normalised_letterbox_grey():
    expected = [(PAD_VALUE / 255 - m) / s for m, s in zip(IMAGE_MEAN, IMAGE_STD)]
    assert torch.allclose(torch.tensor(PAD_NORMALISED), torch.tensor(expected))
    out = build_view("scale_0.5").apply(torch.randn(2, 3, S, S))
    assert torch.allclose(out[:, :, :4, :4], torch.tensor(PAD_NORMALISED).view(1, 3, 1, 1).expand(2, 3, 4, 4))


@pytest.mark.parametrize("name", VIEW_NAMES)
def test_boxes_map_to_the_view_and_back_exactly(name):
    view = build_view(name)
    boxes = torch.rand(50, 4, dtype=torch.float64) * torch.tensor([0.6, 0.6, 0.4, 0.4]) + 0.2
    there = view.boxes_to_view(boxes)
    back = view.boxes_to_original(there)
    assert torch.allclose(back, boxes, atol=1e-12, rtol=0)
    assert view.name == name


def test_flipped_view_box_maps_back_to_the_painted_box():
    # Paint a rectangle, flip the image, find the rectangle in the flipped image, map it back.
    box = (8, 12, 24, 40)
    view = build_view("hflip")
    flipped = view.apply(_painted(box))
    found = _extent_cxcywh(flipped)
    assert torch.allclose(found, torch.tensor([1 - 16 / S, 26 / S, 16 / S, 28 / S]))
    assert torch.allclose(view.boxes_to_original(found), _extent_cxcywh(_painted(box)), atol=1e-7)


@pytest.mark.parametrize("name", ["scale_0.5", "scale_2", "shift_0.125_-0.0625", "hflip+scale_0.5"])
def test_geometric_views_move_the_image_as_their_box_map_says(name):
    # Box edges chosen so that every mapped edge falls on a pixel edge: the bright region of
    # the transformed image must then be exactly the mapped box (bilinear, align_corners=False).
    box_px = (24, 20, 40, 36)
    view = build_view(name)
    original = _extent_cxcywh(_painted(box_px))
    transformed = view.apply(_painted(box_px))
    expected = view.boxes_to_view(original)
    assert torch.allclose(_extent_cxcywh(transformed), expected, atol=1e-6), name
    assert torch.allclose(view.boxes_to_original(_extent_cxcywh(transformed)), original, atol=1e-6)


def test_identity_and_flip_are_lossless_on_pixels():
    x = torch.randn(2, 3, S, S)
    assert torch.equal(build_view("identity").apply(x), x)
    assert torch.equal(build_view("hflip").apply(build_view("hflip").apply(x)), x)
    # A sub-pixel-free affine view (zoom 1, no shift) resamples to the same pixels, up to the
    # rounding of affine_grid's coordinates: with one torch thread its matmul rounds differently,
    # and N(0, 1) pixels 64 apart then move by up to ~2e-5 (with two threads ~2e-7).
    assert torch.allclose(build_view("scale_1").apply(x), x, atol=1e-4)


def test_view_names_are_validated():
    assert [v.name for v in build_views(["identity", "hflip", "scale_0.9"])] == ["identity", "hflip", "scale_0.9"]
    for bad in ["rotate_10", "scale_x", "scale_9", "shift_0.6", "shift_1_2_3"]:
        with pytest.raises(ValueError):
            build_view(bad)
    with pytest.raises(ValueError, match="duplicates"):
        build_views(["hflip", "hflip"])
    with pytest.raises(ValueError, match="empty"):
        build_views([])
    with pytest.raises(TypeError):
        build_views("hflip")
    with pytest.raises(ValueError, match=r"\[B, 3, S, S\]"):
        build_view("scale_0.5").apply(torch.zeros(3, S, S))


def test_random_zoom_out_shrinks_images_and_moves_their_boxes_exactly():
    from date_core.adapt import random_zoom_out
    from date_core.batch import IMAGE_MEAN, IMAGE_STD

    s, n = 64, 6
    white = (1.0 - IMAGE_MEAN[0]) / IMAGE_STD[0]
    pixels = torch.full((n, 3, s, s), -1.0)
    pixels[:, :, 16:48, 8:40] = white                      # a bright box, x 8..40, y 16..48
    box = torch.tensor([[24 / s, 32 / s, 32 / s, 32 / s]]).repeat(n, 1)
    alt = torch.zeros(n, 2, 4)
    alt[:, 0] = box[0]
    gen = torch.Generator().manual_seed(0)
    out = random_zoom_out({"pixel_values": pixels, "boxes": box, "alt_boxes": alt}, (0.5, 0.8), prob=1.0,
                          generator=gen)
    assert (out["boxes"][:, 2] < box[:, 2]).all() and (out["boxes"][:, 2] >= 0.5 * box[:, 2] - 1e-6).all()
    assert torch.equal(out["alt_boxes"][:, 1], alt[:, 1])  # empty slots stay empty
    assert torch.allclose(out["alt_boxes"][:, 0], out["boxes"])
    for i in range(n):
        bright = out["pixel_values"][i, 0] > 0.0           # the pad grey and the background are darker
        ys, xs = torch.nonzero(bright, as_tuple=True)
        cx, cy, w, h = (out["boxes"][i] * s).tolist()
        assert abs(xs.min().item() - (cx - w / 2)) <= 1.5 and abs(xs.max().item() + 1 - (cx + w / 2)) <= 1.5
        assert abs(ys.min().item() - (cy - h / 2)) <= 1.5 and abs(ys.max().item() + 1 - (cy + h / 2)) <= 1.5
    same = random_zoom_out({"pixel_values": pixels, "boxes": box}, (0.5, 0.8), prob=0.0)
    assert same["pixel_values"] is pixels
    with pytest.raises(ValueError):
        random_zoom_out({"pixel_values": pixels, "boxes": box}, (0.1, 0.8), prob=1.0)


def test_focus_puts_each_images_centre_in_the_middle_zoomed_and_maps_back_exactly():
    from date_core.adapt import Focus

    # Two images, two centres: every zoomed edge falls on a pixel edge (S = 64, zoom 2).
    boxes_px = [(24, 20, 40, 36), (8, 8, 24, 16)]
    pixels = torch.cat([_painted(b) for b in boxes_px])
    original = torch.stack([_extent_cxcywh(_painted(b)) for b in boxes_px])
    focus = Focus(2.0, original[:, :2])
    zoomed = focus.apply(pixels)
    assert focus.name == "focus_2"
    for i in range(2):
        found = _extent_cxcywh(zoomed[i:i + 1])
        assert torch.allclose(found[:2], torch.tensor([0.5, 0.5]), atol=1e-6)      # the centre moved to the middle
        assert torch.allclose(found[2:], 2 * original[i, 2:], atol=1e-6)           # twice as large
        assert torch.allclose(focus.boxes_to_view(original)[i], found, atol=1e-6)
    assert torch.allclose(focus.boxes_to_original(focus.boxes_to_view(original)), original, atol=1e-6)
    # per-sample maps broadcast over extra box dimensions ([N, M, 4]) too
    many = original[:, None].expand(2, 3, 4)
    assert torch.allclose(focus.boxes_to_original(focus.boxes_to_view(many)), many, atol=1e-6)
    with pytest.raises(ValueError, match="centres"):
        Focus(2.0, original[:1, :2]).apply(pixels)
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        Focus(2.0, original)
