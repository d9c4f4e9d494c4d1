"""Manifest source: one image-query pair per JSON line (or per row of a Parquet table).

Fields of a row::

    image     local path or s3:// URI (a relative path is relative to the manifest's folder)
    query     the text query
    box       [x1, y1, x2, y2] in pixels, or null / absent when unannotated
    alt_boxes optional list of boxes that also answer the query
    domain    e.g. mall / live
    split     optional: train / val / test (else by a hash of image_id)
    item_id   the product (relevance for retrieval)
    instance_ids optional list of the products a multi-product query shows (instance-level
              retrieval; see ``OPTIONAL_COLUMNS`` in schema.py), order and repeats kept
    pair_id   optional (default ``<manifest name>:<line>``), image_id optional (default: ``image``
              as written), width / height optional (checked against the image when given)

A line that is not UTF-8, not a JSON object, lacks a field or has one of the wrong type is a
rejected row (``raw`` keeps its text). A required field absent from *every* row is a structural
error (:class:`DataError`): the file is not a manifest of this kind.
"""
from __future__ import annotations

import json
import posixpath
from pathlib import Path
from typing import Any, Iterator

import pyarrow.parquet as pq

from . import storage
from .schema import DataError
from .validate import (
    BAD_TYPE, INVALID_JSON, INVALID_UTF8, Rejection, check_instance_ids, coerce_box, coerce_boxes, check_split,
    require_str,
)

REQUIRED_FIELDS = ("image", "query", "domain", "item_id")
RAW_LIMIT = 2000  # characters of the original line kept with a rejected row


def resolve_ref(ref: str, base: str) -> str:
    """An image reference as a readable location: URIs and absolute paths as they are,
    relative paths under ``base`` (the manifest's folder, local or s3)."""
    if storage.is_s3(ref) or Path(ref).is_absolute():
        return ref
    if storage.is_s3(base):
        return posixpath.join(base, ref)
    return str(Path(base, ref))


def manifest_record(obj: Any, *, source: str, default_pair_id: str, base: str) -> dict[str, Any]:
    """One parsed JSON object -> a record dict, or a rejected-row dict (with ``reason``)."""
    if not isinstance(obj, dict):
        return {"source": source, "raw": _raw(obj), "reason": INVALID_JSON,
                "detail": f"a line must hold a JSON object, got {type(obj).__name__}"}
    rec: dict[str, Any] = {"source": source}
    # Keep every readable field on the way, so a rejected row carries as much as possible.
    for name in ("pair_id", "image_id", "query", "domain", "split", "item_id"):
        value = obj.get(name)
        rec[name] = value if isinstance(value, str) else None
    try:
        image = require_str(obj.get("image"), "image")
        rec["image_ref"] = resolve_ref(image, base)
        rec["image_id"] = require_str(obj.get("image_id", image), "image_id")
        rec["pair_id"] = require_str(obj.get("pair_id", default_pair_id), "pair_id")
        rec["query"] = obj.get("query")
        if rec["query"] is not None and not isinstance(rec["query"], str):
            raise Rejection(BAD_TYPE, f"query must be a string, got {type(rec['query']).__name__}")
        rec["domain"] = require_str(obj.get("domain"), "domain")
        rec["item_id"] = require_str(obj.get("item_id"), "item_id")
        rec["split"] = check_split(obj.get("split"))
        rec["box"] = coerce_box(obj.get("box"))
        rec["alt_boxes"] = coerce_boxes(obj.get("alt_boxes"))
        rec["instance_ids"] = check_instance_ids(obj.get("instance_ids"))
        for name in ("width", "height"):
            value = obj.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise Rejection(BAD_TYPE, f"{name} must be an integer, got {type(value).__name__}")
            rec[name] = value
    except Rejection as rej:
        return {**rec, "raw": _raw(obj), "reason": rej.reason, "detail": rej.detail}
    return rec


def _raw(obj: Any) -> str:
    try:
        return json.dumps(obj, ensure_ascii=False, default=repr)[:RAW_LIMIT]
    except (TypeError, ValueError):
        return repr(obj)[:RAW_LIMIT]


def iter_manifest(path: str) -> Iterator[dict[str, Any]]:
    """Records and rejected rows of a ``.jsonl`` or ``.parquet`` manifest (local or s3)."""
    if not storage.exists(path):
        raise DataError(path, "file not found")
    base = posixpath.dirname(str(path)) if storage.is_s3(path) else str(Path(path).resolve().parent)
    stem = posixpath.basename(str(path))
    if str(path).endswith(".parquet"):
        yield from _iter_parquet(path, stem, base)
    else:
        yield from _iter_jsonl(path, stem, base)


def _iter_jsonl(path: str, stem: str, base: str) -> Iterator[dict[str, Any]]:
    try:
        data = storage.read_bytes(path)
    except OSError as exc:
        raise DataError(path, f"unreadable: {exc}") from None
    seen_fields: set[str] = set()
    rows = 0
    for lineno, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue  # blank lines carry no row
        rows += 1
        source = f"{path}:{lineno}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield {"source": source, "raw": line.decode("utf-8", "backslashreplace")[:RAW_LIMIT],
                   "reason": INVALID_UTF8, "detail": str(exc)}
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            yield {"source": source, "raw": text[:RAW_LIMIT], "reason": INVALID_JSON, "detail": str(exc)}
            continue
        if isinstance(obj, dict):
            seen_fields.update(k for k, v in obj.items() if v is not None)
        yield manifest_record(obj, source=source, default_pair_id=f"{stem}:{lineno}", base=base)
    # Checked at the end (rows stream out as they are read): a field no row has is not a row
    # problem but a file in the wrong format.
    missing = [f for f in REQUIRED_FIELDS if f not in seen_fields]
    if rows and missing:
        raise DataError(path, f"no row has the required field(s) {', '.join(missing)}")


def _iter_parquet(path: str, stem: str, base: str) -> Iterator[dict[str, Any]]:
    fs, p = storage.resolve_filesystem(path)
    try:
        pf = pq.ParquetFile(p, filesystem=fs)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for a non-Parquet file
        raise DataError(path, f"unreadable Parquet: {exc}") from None
    missing = [f for f in REQUIRED_FIELDS if f not in pf.schema_arrow.names]
    if missing:
        raise DataError(path, f"missing column(s) {', '.join(missing)}")
    row = 0
    for batch in pf.iter_batches(batch_size=4096):
        for obj in batch.to_pylist():
            row += 1
            obj = {k: v for k, v in obj.items() if v is not None}
            yield manifest_record(obj, source=f"{path}:row{row}", default_pair_id=f"{stem}:{row}", base=base)
