"""Instance mode of a Pascal VOC source (e.g. Freiburg groceries): real product crops composed
into multi-product query images, held-out single-product photos as the gallery.

Freiburg groceries has no finer identity than the class (25 classes; every box of a photo has
the photo's class), so an instance label is the class name.

- The gallery: ``gallery_per_class`` photos of each class (chosen by a hash of the image id
  and the seed), never cropped into a query. Each is one row of ``single/gallery``: the photo
  as it is, ``box`` its class's largest box and ``alt_boxes`` the others, ``query`` the class
  phrase ("a jar of honey"), ``item_id`` the class, ``instance_ids = [class]``.
- Every other photo is a crop source, assigned to train/val/test by a hash of its image id, so
  a test query's products come from photos no train query uses.
- A query (``multi/<split>``): 2-4 distinct classes, one crop each (the photo's largest box),
  resized and placed without overlap on a studio backdrop (ProductWorld's
  :func:`~date_core.data.productworld.scene.studio_background` and
  :func:`~date_core.data.productworld.scene.place`); ``instance_ids`` = the classes left to
  right, ``item_id`` the first; ``query`` a shop caption naming some of the shown products and,
  with probability ``unshown_prob``, a class that is not shown; ``box`` null.

Deterministic from the seed: :func:`plan_voc_instances` fixes the sources (in the driver, from
the annotations only), :func:`render_voc_instance_rows` draws row ``g`` from ``(seed, g)``.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from ..batch import stable_key
from . import storage
from .productworld.scene import encode_jpeg, place, studio_background
from .schema import GALLERY_SPLIT, SPLITS
from .splits import DEFAULT_FRACTIONS, assign_split
from .voc import class_phrase, iter_voc

MULTI_DOMAIN = "multi"
SINGLE_DOMAIN = "single"
CANVAS = (320, 240)

_CAPTIONS = (
    "Weekly deals: {list}",
    "Fresh in store {list}",
    "{list} - buy 2 get 1 free",
    "Your pantry essentials: {list}",
    "Breakfast set with {list}, free delivery",
    "Hot sale | {list} | while stocks last",
)
_UNSHOWN = (" - also on offer: {x}", ", and don't miss {x}", " (see also {x})")


@dataclass
class VocInstancePlan:
    """The rows of a VOC instance dataset: the composed queries, then the gallery photos."""

    seed: int
    #: Per query: its split and its crop sources, each ``{"image_ref", "box", "label", "image_id"}``.
    queries: list[dict[str, Any]]
    #: Gallery records (contract fields + ``image_ref``; the image is loaded at ingest).
    gallery: list[dict[str, Any]]
    classes: list[str]
    unshown_prob: float = 0.4
    #: Photos the VOC parser could not use (a reason code -> count).
    unusable: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.queries) + len(self.gallery)

    def counts(self) -> dict[str, Any]:
        splits = [q["split"] for q in self.queries]
        return {"multi": {s: splits.count(s) for s in SPLITS if s in splits}, "gallery": len(self.gallery),
                "classes": len(self.classes), "unshown_prob": self.unshown_prob,
                "unusable_photos": dict(self.unusable)}


def plan_voc_instances(root: str, queries: int, seed: int, *, fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
                       gallery_per_class: int = 10, products: tuple[int, int] = (2, 4),
                       unshown_prob: float = 0.4) -> VocInstancePlan:
    """Read the VOC annotations at ``root`` (no image is opened) and plan ``queries`` composed
    queries and the gallery. Raises :class:`~date_core.data.schema.DataError` for a folder that
    is not VOC, ``ValueError`` when there are too few classes to compose from."""
    by_class: dict[str, list[dict[str, Any]]] = {}
    unusable: dict[str, int] = {}
    for rec in iter_voc(root, SINGLE_DOMAIN):
        if rec.get("reason"):
            unusable[rec["reason"]] = unusable.get(rec["reason"], 0) + 1
            continue
        by_class.setdefault(rec["item_id"], []).append(rec)
    classes = sorted(by_class)
    gallery: list[dict[str, Any]] = []
    sources: dict[str, dict[str, list[dict[str, Any]]]] = {s: {} for s in SPLITS}
    for name in classes:
        recs = sorted(by_class[name], key=lambda r: stable_key(f"{seed}:gallery:{r['image_id']}"))
        for rec in recs[:gallery_per_class]:
            gallery.append({
                "pair_id": f"gallery:{rec['image_id']}", "image_id": rec["image_id"],
                "image_ref": rec["image_ref"], "width": rec.get("width"), "height": rec.get("height"),
                "query": rec["query"], "box": rec["box"], "alt_boxes": rec["alt_boxes"],
                "domain": SINGLE_DOMAIN, "split": GALLERY_SPLIT, "item_id": name, "instance_ids": [name],
                "source": rec["source"],
            })
        for rec in recs[gallery_per_class:]:
            split = assign_split(rec["image_id"], fractions, salt="voc-instance:")
            sources[split].setdefault(name, []).append(
                {"image_ref": rec["image_ref"], "box": rec["box"], "label": name, "image_id": rec["image_id"]})
    lo, hi = products
    plan_queries: list[dict[str, Any]] = []
    for i in range(queries):
        split = assign_split(f"voci-{seed}-multi-{i}", fractions)
        avail = sorted(sources[split])
        if len(avail) < lo:
            raise ValueError(f"{root}: split {split!r} has crop sources of {len(avail)} class(es), "
                             f"a query needs {lo}; lower --gallery-per-class or change --splits")
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xF00D, i]))
        n = int(rng.integers(lo, min(hi, len(avail)) + 1))
        picked = [avail[int(j)] for j in rng.choice(len(avail), size=n, replace=False)]
        crops = [sources[split][c][int(rng.integers(len(sources[split][c])))] for c in picked]
        plan_queries.append({"split": split, "crops": crops})
    return VocInstancePlan(int(seed), plan_queries, gallery, classes, float(unshown_prob), unusable)


def _phrase(label: str) -> str:
    return class_phrase(label)


def write_voc_caption(rng: np.random.Generator, shown: Sequence[str], classes: Sequence[str],
                      unshown_prob: float) -> tuple[str, list[str], str | None]:
    """A shop caption -> (text, shown classes it names (at least one), the unshown class it
    also mentions or None)."""
    k = int(rng.integers(1, len(shown) + 1))
    named = [shown[int(i)] for i in sorted(rng.choice(len(shown), size=k, replace=False))]
    phrases = [_phrase(c) for c in named]
    phrases = [phrases[int(i)] for i in rng.permutation(len(phrases))]
    others = [c for c in classes if c not in shown]
    unshown = others[int(rng.integers(len(others)))] if others and rng.random() < unshown_prob else None
    template = _CAPTIONS[int(rng.integers(len(_CAPTIONS)))]
    if unshown is not None and rng.random() < 0.5:
        phrases.insert(int(rng.integers(len(phrases) + 1)), _phrase(unshown))
        unshown_suffix = ""
    else:
        unshown_suffix = _UNSHOWN[int(rng.integers(len(_UNSHOWN)))].format(x=_phrase(unshown)) if unshown else ""
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return template.format(list=text) + unshown_suffix, named, unshown


def _crop(ref: str, box: Sequence[float]) -> Image.Image:
    img = Image.open(io.BytesIO(storage.read_bytes(ref))).convert("RGB")
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    return img.crop((max(0, x1), max(0, y1), min(img.width, max(x2, x1 + 1)), min(img.height, max(y2, y1 + 1))))


def compose_query(plan: VocInstancePlan, i: int) -> dict[str, Any]:
    """Query ``i`` of ``plan`` as a record (with ``mentioned`` / ``unshown``, not contract columns)."""
    q = plan.queries[i]
    rng = np.random.default_rng(np.random.SeedSequence([plan.seed, 0xC0DE, i]))
    w, h = CANVAS
    canvas = studio_background(rng, w, h)
    placed: list[tuple[float, float, float, float]] = []
    shown: list[tuple[float, str]] = []
    scale_hi = 0.62 if len(q["crops"]) <= 2 else 0.5
    for crop in q["crops"]:
        img = _crop(crop["image_ref"], crop["box"])
        longest = rng.uniform(0.36, scale_hi) * h
        best = None
        for _ in range(6):
            f = longest / max(img.width, img.height)
            size = (max(8, min(w, int(round(img.width * f)))), max(8, min(h, int(round(img.height * f)))))
            pos, score = place(rng, size, (w, h), placed, None)
            if best is None or score < best[1]:
                best = (pos, score, size)
            if score <= 0.05:
                break
            longest *= 0.88
        (x, y), _, size = best
        canvas.paste(img.resize(size, Image.BILINEAR), (x, y))
        placed.append((float(x), float(y), float(x + size[0]), float(y + size[1])))
        shown.append((float(x), crop["label"]))
    labels = [label for _, label in sorted(shown, key=lambda t: t[0])]
    caption, named, unshown = write_voc_caption(rng, labels, plan.classes, plan.unshown_prob)
    image_id = f"voci-{plan.seed}-multi-{i}"
    return {
        "pair_id": image_id, "image_id": image_id, "image": encode_jpeg(canvas, 92), "width": w, "height": h,
        "query": caption, "box": None, "alt_boxes": None, "domain": MULTI_DOMAIN, "split": q["split"],
        "item_id": labels[0], "instance_ids": labels,
        "source": "voc-instance:" + ",".join(c["image_id"] for c in q["crops"]),
        "mentioned": named, "unshown": unshown,
    }


def render_voc_instance_rows(indices: Sequence[int], plan: VocInstancePlan) -> list[dict]:
    """Records of rows ``indices``: composed queries, then gallery photos (loaded at ingest)."""
    n_q = len(plan.queries)
    rows = []
    for g in (int(i) for i in indices):
        if not 0 <= g < plan.total:
            raise IndexError(f"row {g} outside the plan's {plan.total} rows")
        rows.append(compose_query(plan, g) if g < n_q else dict(plan.gallery[g - n_q]))
    return rows
