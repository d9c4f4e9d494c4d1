"""Product1M source: ``#####``-separated text lines, images already on disk (or s3).

A line is ``item_id#####title#####url[#####url ...][#####label#;#label...]``: the product's
id, its title (the query; Chinese), one or more URLs of the same image (mirrors), and, in the
dev/test/gallery files, the instance labels joined by ``#;#``. Nothing is downloaded: the
image is looked up in ``--images DIR`` by each URL's file name, then by ``<item_id>.jpg``
(the layout of the common download scripts). A line whose image is not there is a rejected
row (``missing_image``).

Instance labels: ``instance_ids`` is the label field split at ``#;#``, each stripped, empty
ones dropped, order and repeats kept (Product1M lists a product twice when the set holds two,
and its official mAR weights labels by these counts); null when the line has no label field
(the training file). ``item_id`` of a pair is its distinct labels sorted and joined by ``#;#``
(pairs showing the same instances are relevant to each other) when the line has labels, else
the line's own id. Product1M has no boxes: ``box`` is null.
"""
from __future__ import annotations

import posixpath
from typing import Any, Iterator
from urllib.parse import urlparse

from . import storage
from .schema import DataError
from .validate import INVALID_LINE, INVALID_UTF8, MISSING_IMAGE

FIELD_SEP = "#####"
LABEL_SEP = "#;#"
RAW_LIMIT = 2000


def _is_url(text: str) -> bool:
    return "://" in text or text.startswith("//")


def parse_line(text: str) -> tuple[str, str, list[str], list[str]]:
    """One line -> (item id, title, image URLs, instance labels in the line's order, repeats
    kept). ``ValueError`` when malformed."""
    fields = text.rstrip("\r\n").split(FIELD_SEP)
    if len(fields) < 3:
        raise ValueError(f"expected item_id{FIELD_SEP}title{FIELD_SEP}url..., got {len(fields)} field(s)")
    item, title, rest = fields[0].strip(), fields[1], fields[2:]
    urls = [f.strip() for f in rest if _is_url(f.strip())]
    labels_text = [f for f in rest if f.strip() and not _is_url(f.strip())]
    if not item:
        raise ValueError("empty item id")
    if not urls:
        raise ValueError("no image URL")
    labels = [lab.strip() for t in labels_text for lab in t.split(LABEL_SEP) if lab.strip()]
    return item, title, urls, labels


def _url_name(url: str) -> str:
    return posixpath.basename(urlparse(url if "://" in url else "http:" + url).path)


def iter_product1m(path: str, images: str, domain: str = "mall") -> Iterator[dict[str, Any]]:
    """Records (and rejected rows) of one Product1M text file."""
    if not storage.exists(path):
        raise DataError(path, "file not found")
    if not storage.exists(images):
        raise DataError(images, "images folder not found")
    try:
        data = storage.read_bytes(path)
    except OSError as exc:
        raise DataError(path, f"unreadable: {exc}") from None
    # Index every image file by name once: a dict lookup per line, local or s3 alike.
    by_name: dict[str, str] = {}
    for p in storage.list_files(images):
        by_name.setdefault(posixpath.basename(p), f"s3://{p}" if storage.is_s3(images) else p)
    for lineno, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        source = f"{path}:{lineno}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield {"source": source, "domain": domain, "reason": INVALID_UTF8, "detail": str(exc),
                   "raw": line.decode("utf-8", "backslashreplace")[:RAW_LIMIT]}
            continue
        try:
            item, title, urls, labels = parse_line(text)
        except ValueError as exc:
            yield {"source": source, "domain": domain, "reason": INVALID_LINE, "detail": str(exc),
                   "raw": text[:RAW_LIMIT]}
            continue
        names = [_url_name(u) for u in urls] + [f"{item}.jpg"]
        found = next((by_name[n] for n in names if n in by_name), None)
        rec = {
            "pair_id": item, "image_id": posixpath.splitext(names[0])[0] or item, "query": title,
            "domain": domain, "item_id": LABEL_SEP.join(sorted(set(labels))) if labels else item,
            "instance_ids": labels or None, "box": None, "alt_boxes": None, "source": source,
        }
        if found is None:
            yield {**rec, "raw": text[:RAW_LIMIT], "reason": MISSING_IMAGE,
                   "detail": f"none of {', '.join(dict.fromkeys(names))} in {images}"}
            continue
        yield {**rec, "image_ref": found}
