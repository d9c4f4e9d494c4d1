"""Pascal VOC source: one pair per (image, object class).

Accepted layouts (local or s3)::

    DIR/annotations/<sub>/X.xml + DIR/images/<sub>/X.jpg   (e.g. Freiburg groceries)
    DIR/Annotations/X.xml      + DIR/JPEGImages/X.jpg      (the VOC devkit)

The query is a natural phrase built from the class name ("a pack of coffee"), the class's
largest box is ``box`` and its other boxes ``alt_boxes`` (a shelf with three packs of the same
coffee: any of them answers the query), ``item_id`` is the class name (relevance = same class).
VOC coordinates are 1-based and inclusive; they become 0-based continuous pixels by
``x1 - 1, y1 - 1, x2, y2``, as detectron2's VOC loader does.
"""
from __future__ import annotations

import posixpath
import xml.etree.ElementTree as ET
from typing import Any, Iterator

from . import storage
from .schema import DataError
from .validate import INVALID_ANNOTATION, MISSING_IMAGE, NO_OBJECTS

ANNOTATION_DIRS = ("annotations", "Annotations")
IMAGE_DIRS = ("images", "JPEGImages", "Images")

#: How a shopper would ask for one item of a class (Freiburg groceries' 25 classes); any other
#: class name gets :data:`DEFAULT_TEMPLATE`.
PHRASES = {
    "beans": "a can of beans", "cake": "a pack of cake", "candy": "a bag of candy",
    "cereal": "a box of cereal", "chips": "a bag of chips", "chocolate": "a bar of chocolate",
    "coffee": "a pack of coffee", "corn": "a can of corn", "fish": "a can of fish",
    "flour": "a bag of flour", "honey": "a jar of honey", "jam": "a jar of jam",
    "juice": "a carton of juice", "milk": "a carton of milk", "nuts": "a bag of nuts",
    "oil": "a bottle of oil", "pasta": "a pack of pasta", "rice": "a bag of rice",
    "soda": "a bottle of soda", "spices": "a jar of spices", "sugar": "a bag of sugar",
    "tea": "a box of tea", "tomato_sauce": "a jar of tomato sauce", "vinegar": "a bottle of vinegar",
    "water": "a bottle of water",
}
DEFAULT_TEMPLATE = "a pack of {name}"


def class_phrase(name: str, template: str | None = None) -> str:
    """The query for class ``name``: ``template`` (with ``{name}``) when given, else the phrase table."""
    words = name.replace("_", " ").strip()
    if template:
        return template.format(name=words)
    return PHRASES.get(name.lower(), DEFAULT_TEMPLATE.format(name=words))


def _text(node: ET.Element, tag: str) -> str | None:
    child = node.find(tag)
    return child.text.strip() if child is not None and child.text else None


def parse_annotation(xml: bytes) -> tuple[str | None, int | None, int | None, dict[str, list[list[float]]]]:
    """VOC XML -> (filename, width or None, height or None, {class: [[x1, y1, x2, y2], ...]}).

    Raises ``ValueError`` when the XML or a box cannot be read.
    """
    root = ET.fromstring(xml)
    width = int(float(_text(root, "size/width") or 0)) or None
    height = int(float(_text(root, "size/height") or 0)) or None
    boxes: dict[str, list[list[float]]] = {}
    for obj in root.findall("object"):
        name = _text(obj, "name")
        bnd = obj.find("bndbox")
        if not name or bnd is None:
            raise ValueError("an <object> without <name> or <bndbox>")
        x1, y1, x2, y2 = (float(_text(bnd, k) or "nan") for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes.setdefault(name, []).append([max(x1 - 1.0, 0.0), max(y1 - 1.0, 0.0), x2, y2])
    return _text(root, "filename"), width, height, boxes


def _area(box: list[float]) -> float:
    return max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)


def iter_voc(root: str, domain: str, query_template: str | None = None) -> Iterator[dict[str, Any]]:
    """Records (and rejected rows) of a VOC folder, one per (image, class), in a stable order."""
    fs, base = storage.resolve_filesystem(root)
    ann_dir = next((d for d in ANNOTATION_DIRS if storage.exists(storage.join(root, d))), None)
    if ann_dir is None:
        raise DataError(root, f"no {' or '.join(ANNOTATION_DIRS)} folder: not a Pascal VOC dataset")
    ann_base = posixpath.join(base, ann_dir)
    xmls = storage.list_files(storage.join(root, ann_dir), ".xml")
    if not xmls:
        raise DataError(storage.join(root, ann_dir), "no .xml annotation files")
    # One listing of every file, so that finding an image is a set lookup (fast on S3 too).
    files = set(storage.list_files(root))
    for xml_path in xmls:
        rel = posixpath.relpath(xml_path, ann_base)            # e.g. beans/BEANS0000.xml
        sub, stem = posixpath.dirname(rel), posixpath.splitext(posixpath.basename(rel))[0]
        source = f"{ann_dir}/{rel}"
        try:
            with fs.open_input_stream(xml_path) as fh:
                filename, width, height, by_class = parse_annotation(fh.read())
        except (ET.ParseError, ValueError, OSError) as exc:
            yield {"source": source, "domain": domain, "reason": INVALID_ANNOTATION, "detail": str(exc)[:300]}
            continue
        filename = filename or f"{stem}.jpg"
        candidates = [posixpath.join(base, d, sub, filename) for d in IMAGE_DIRS]
        candidates += [posixpath.join(base, d, filename) for d in IMAGE_DIRS]
        candidates.append(posixpath.join(posixpath.dirname(xml_path), filename))
        image_path = next((c for c in candidates if c in files), None)
        image_id = posixpath.join(sub, stem) if sub else stem
        if not by_class:
            yield {"source": source, "domain": domain, "image_id": image_id, "reason": NO_OBJECTS,
                   "detail": "the annotation has no <object>"}
            continue
        if image_path is None:
            yield {"source": source, "domain": domain, "image_id": image_id, "reason": MISSING_IMAGE,
                   "detail": f"{filename} not found under {'/'.join(IMAGE_DIRS)}"}
            continue
        image_ref = f"s3://{image_path}" if storage.is_s3(root) else image_path
        for name in sorted(by_class):
            boxes = sorted(by_class[name], key=_area, reverse=True)
            yield {
                "pair_id": f"{image_id}:{name}", "image_id": image_id, "image_ref": image_ref,
                "width": width, "height": height, "query": class_phrase(name, query_template),
                "box": boxes[0], "alt_boxes": boxes[1:], "domain": domain, "item_id": name,
                "source": source,
            }
