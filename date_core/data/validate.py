"""Row validation: every check a pair must pass, each failure a short stable reason code.

Checks are pure functions on Python values so that the manifest/VOC/Product1M parsers (which
see raw JSON/XML) and the ingest step (which sees decoded images) share one definition.
A row-level problem never raises: it becomes a :class:`Rejection`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .schema import ROW_SPLITS

# Reason codes (stable: they are column values in rejected/ and keys in _summary.json).
INVALID_UTF8 = "invalid_utf8"          # a manifest line that is not UTF-8
INVALID_JSON = "invalid_json"          # a manifest line that is not one JSON object
MISSING_FIELD = "missing_field"        # a required field absent or null
BAD_TYPE = "bad_type"                  # a field of the wrong type (query not a string, ...)
BAD_BOX = "bad_box"                    # not 4 finite numbers
DEGENERATE_BOX = "degenerate_box"      # x2 <= x1 or y2 <= y1
BOX_OUTSIDE_IMAGE = "box_outside_image"
EMPTY_QUERY = "empty_query"            # empty or whitespace-only
BAD_SPLIT = "bad_split"                # a split name other than train/val/test/gallery
SPLIT_CONFLICT = "split_conflict"      # an image given two different splits
DUPLICATE_PAIR_ID = "duplicate_pair_id"
MISSING_IMAGE = "missing_image"        # no file at the path/URI
UNREADABLE_IMAGE = "unreadable_image"  # the file exists but reading it failed
UNDECODABLE_IMAGE = "undecodable_image"
SIZE_MISMATCH = "size_mismatch"        # declared width/height differ from the decoded image
INVALID_LINE = "invalid_line"          # a text line without the fields its format needs
INVALID_ANNOTATION = "invalid_annotation"  # an annotation file that cannot be parsed
NO_OBJECTS = "no_objects"              # an annotation with no object: no query to make

#: A box may overshoot the image by this many pixels (annotation tools round outwards); it is
#: clipped to the image and counted. Beyond it the box is rejected: it was drawn on another frame.
BOX_TOLERANCE_PX = 1.0


@dataclass(frozen=True)
class Rejection(Exception):
    """Why a row was rejected: ``reason`` is one of the codes above, ``detail`` is for humans."""

    reason: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


def require_str(value: Any, field: str, *, allow_empty: bool = False) -> str:
    """``value`` as a string, or a :class:`Rejection` (missing / wrong type / empty)."""
    if value is None:
        raise Rejection(MISSING_FIELD, f"{field} is missing")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise Rejection(BAD_TYPE, f"{field} must be a string, got {type(value).__name__}")
    text = str(value)
    if not allow_empty and not text.strip():
        raise Rejection(EMPTY_QUERY if field == "query" else MISSING_FIELD, f"{field} is empty")
    return text


def check_query(value: Any) -> str:
    """A non-empty query string (kept verbatim; only emptiness is judged after stripping)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        raise Rejection(BAD_TYPE, f"query must be a string, got {type(value).__name__}")
    return require_str(value, "query")


def coerce_box(value: Any, field: str = "box") -> list[float] | None:
    """``[x1, y1, x2, y2]`` of finite numbers (None stays None), or a :class:`Rejection`.

    Only the shape and type are judged here; the geometry needs the image (:func:`check_box`).
    """
    if value is None:
        return None
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__len__"):
        raise Rejection(BAD_TYPE, f"{field} must be a list of 4 numbers, got {type(value).__name__}")
    if len(value) != 4:
        raise Rejection(BAD_BOX, f"{field} must have 4 numbers, got {len(value)}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
            raise Rejection(BAD_TYPE, f"{field} must hold numbers, got {type(v).__name__}")
        f = float(v)
        if not math.isfinite(f):
            raise Rejection(BAD_BOX, f"{field} has a non-finite coordinate")
        out.append(f)
    return out


def coerce_boxes(value: Any, field: str = "alt_boxes") -> list[list[float]] | None:
    """A list of boxes (None stays None); each box as in :func:`coerce_box`."""
    if value is None:
        return None
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__len__"):
        raise Rejection(BAD_TYPE, f"{field} must be a list of boxes, got {type(value).__name__}")
    return [coerce_box(b, f"{field}[{i}]") for i, b in enumerate(value)]


def check_box(box: list[float], width: int, height: int, field: str = "box") -> tuple[list[float], bool]:
    """Judge a box against its image: ``(box clipped to the image, whether it was clipped)``.

    Rejects degenerate boxes (no area) and boxes beyond the image by more than
    :data:`BOX_TOLERANCE_PX`.
    """
    x1, y1, x2, y2 = box
    tol = BOX_TOLERANCE_PX
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        raise Rejection(BOX_OUTSIDE_IMAGE,
                        f"{field} {_fmt(box)} is outside the {width}x{height} image")
    clipped = [min(max(x1, 0.0), width), min(max(y1, 0.0), height),
               min(max(x2, 0.0), width), min(max(y2, 0.0), height)]
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        raise Rejection(DEGENERATE_BOX, f"{field} {_fmt(box)} has no area")
    return clipped, clipped != [x1, y1, x2, y2]


def check_instance_ids(value: Any) -> list[str] | None:
    """Instance labels (``instance_ids``): a list of non-empty strings, order and repeats kept;
    None (no labels) stays None, and so does an empty list (no labels either)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise Rejection(BAD_TYPE, f"instance_ids must be a list of strings, got {type(value).__name__}")
    out = []
    for i, v in enumerate(value):
        if not isinstance(v, str) or not v.strip():
            raise Rejection(BAD_TYPE, f"instance_ids[{i}] must be a non-empty string, got {v!r}"[:300])
        out.append(v)
    return out or None


def check_split(value: Any) -> str | None:
    """A split name from train/val/test (or ``gallery``, see :data:`~.schema.GALLERY_SPLIT`),
    or None when not given."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise Rejection(BAD_TYPE, f"split must be a string, got {type(value).__name__}")
    if value not in ROW_SPLITS:
        raise Rejection(BAD_SPLIT, f"split {value!r} is not one of {', '.join(ROW_SPLITS)}")
    return value


def _fmt(box: list[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"
