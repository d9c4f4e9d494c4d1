"""Turn a batch of *records* (a pair whose image may still be a path or URI) into validated rows.

A record is what a source parser (manifest, VOC, Product1M) or the synthetic generator
produces: the contract fields, with ``image`` either already in hand (bytes) or named by
``image_ref`` (local path or ``s3://`` URI), plus ``source`` (file:line) for error reports.
:func:`ingest_batch` loads, decodes and checks every record and returns one *staged* table in
which ``reason`` is null for a kept row and a reason code for a rejected one, so a single
streaming pass (a Ray Data ``map_batches``) can feed both the dataset and ``rejected/``.
"""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from . import storage
from .schema import BOX_TYPE, BOXES_TYPE, OPTIONAL_COLUMNS, PAIR_COLUMNS, PAIR_SCHEMA, REJECTED_SCHEMA
from .validate import (
    MISSING_FIELD, MISSING_IMAGE, SIZE_MISMATCH, UNDECODABLE_IMAGE, UNREADABLE_IMAGE, Rejection,
    check_box, check_instance_ids, check_query, check_split, coerce_box, coerce_boxes, require_str,
)

#: One record before ingest: every contract field a source can fill, plus ``source`` (where it
#: came from); the same leading fields as a rejected row, so that either can become the other.
RECORD_SCHEMA = pa.schema([REJECTED_SCHEMA.field(name) for name in REJECTED_SCHEMA.names
                           if name not in ("raw", "reason", "detail")])

#: REJECTED_SCHEMA with a nullable reason (null = kept) and ``notes``: corrections made to a
#: kept row (``clipped_box``, ``alt_dropped:<reason>``, ``transcoded:<format>``), counted in
#: the run summary so that nothing changes silently either.
STAGED_SCHEMA = pa.schema([f if f.name != "reason" else pa.field("reason", pa.string())
                           for f in REJECTED_SCHEMA] + [pa.field("notes", pa.string())])

#: Encodings stored as they are; anything else PIL can decode is re-encoded as PNG (lossless).
NATIVE_FORMATS = {"JPEG", "PNG"}
IO_THREADS = 16


def records_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Record dicts -> a :data:`RECORD_SCHEMA` table (absent keys become null)."""
    rows = list(rows)
    return pa.Table.from_pydict({f.name: [r.get(f.name) for r in rows] for f in RECORD_SCHEMA},
                                schema=RECORD_SCHEMA)


def probe_image(data: bytes) -> tuple[bytes, int, int, str | None]:
    """Fully decode ``data`` (at reduced JPEG scale, which still reads every entropy-coded
    block, so truncation and corruption are caught) -> ``(bytes to store, width, height,
    transcoded-from format or None)``. Raises :class:`Rejection` when it is not an image."""
    try:
        img = Image.open(io.BytesIO(data))
        fmt, (width, height) = img.format, img.size
        if fmt == "JPEG":
            img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
        img.load()
        if fmt in NATIVE_FORMATS:
            return data, width, height, None
        out = io.BytesIO()
        img.convert("RGBA" if "A" in img.getbands() else "RGB").save(out, format="PNG")
        return out.getvalue(), width, height, fmt
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise Rejection(UNDECODABLE_IMAGE, f"{type(exc).__name__}: {exc}"[:300]) from None


def load_image_bytes(ref: str) -> bytes:
    """Read one image by local path or ``s3://`` URI; a :class:`Rejection` when impossible."""
    try:
        return storage.read_bytes(ref)
    except FileNotFoundError:
        raise Rejection(MISSING_IMAGE, f"no image at {ref}") from None
    except OSError as exc:
        # pyarrow reports a missing S3 key or a local path that is a directory as OSError.
        text = str(exc)
        if "NoSuchKey" in text or "not found" in text.lower() or "does not exist" in text.lower():
            raise Rejection(MISSING_IMAGE, f"no image at {ref}") from None
        raise Rejection(UNREADABLE_IMAGE, f"{ref}: {text}"[:300]) from None


def _check_row(rec: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Validate one record whose ``image`` bytes are present -> (clean row, notes)."""
    notes: list[str] = []
    row = dict(rec)
    for name in ("pair_id", "image_id", "domain", "item_id"):
        row[name] = require_str(rec.get(name), name)
    row["query"] = check_query(rec.get("query"))
    row["instance_ids"] = check_instance_ids(rec.get("instance_ids"))
    split = check_split(rec.get("split"))
    if split is None:
        raise Rejection(MISSING_FIELD, "split is missing")
    row["split"] = split
    if rec.get("image") is None:
        raise Rejection(MISSING_FIELD, "no image bytes and no image reference")
    data, width, height, transcoded = probe_image(rec["image"])
    if transcoded:
        notes.append(f"transcoded:{transcoded}")
    for name, got in (("width", width), ("height", height)):
        declared = rec.get(name)
        if declared is not None and int(declared) != got:
            raise Rejection(SIZE_MISMATCH, f"declared {name} {declared} but the image has {got}")
    row.update(image=data, width=width, height=height)
    box = coerce_box(rec.get("box"))
    if box is not None:
        box, clipped = check_box(box, width, height)
        if clipped:
            notes.append("clipped_box")
    row["box"] = box
    alts = coerce_boxes(rec.get("alt_boxes"))
    if alts is not None:
        kept_alts = []
        for i, alt in enumerate(alts):
            # A bad alternative box loses that box only (noted), never the pair.
            try:
                alt, clipped = check_box(alt, width, height, f"alt_boxes[{i}]")
            except Rejection as rej:
                notes.append(f"alt_dropped:{rej.reason}")
                continue
            if clipped:
                notes.append("clipped_box")
            kept_alts.append(alt)
        alts = kept_alts
    row["alt_boxes"] = alts
    return row, notes


def _load_and_check(rec: dict[str, Any]) -> dict[str, Any]:
    out = {f.name: rec.get(f.name) for f in STAGED_SCHEMA}
    try:
        if rec.get("image") is None and rec.get("image_ref"):
            rec = {**rec, "image": load_image_bytes(rec["image_ref"])}
            out["image"] = rec["image"]
        row, notes = _check_row(rec)
        out.update({k: row[k] for k in (*PAIR_COLUMNS, "instance_ids")})
        out["notes"] = ";".join(notes) or None
    except Rejection as rej:
        out["reason"], out["detail"] = rej.reason, rej.detail
    return out


def ingest_batch(records: pa.Table, io_threads: int = IO_THREADS) -> pa.Table:
    """Load, decode and validate a batch of records -> a :data:`STAGED_SCHEMA` table, same row
    count and order; ``reason`` null marks a kept row. Image reads and decodes run on a thread
    pool (both release the GIL; reads from S3 are latency-bound)."""
    rows = records.to_pylist()
    if io_threads > 1 and len(rows) > 1:
        with ThreadPoolExecutor(max_workers=min(io_threads, len(rows))) as pool:
            staged = list(pool.map(_load_and_check, rows))
    else:
        staged = [_load_and_check(r) for r in rows]
    return pa.Table.from_pylist(staged, schema=STAGED_SCHEMA)


def split_staged(staged: pa.Table, with_optional: bool = False) -> tuple[pa.Table, pa.Table]:
    """A staged table -> (kept rows as :data:`PAIR_SCHEMA`, rejected rows as :data:`REJECTED_SCHEMA`).

    ``with_optional``: the kept rows also carry the staged table's :data:`OPTIONAL_COLUMNS`
    (``instance_ids``, null where the source has none), after the contract columns; a writer
    that asks for them must write with the kept table's schema, not :data:`PAIR_SCHEMA`.
    """
    is_rejected = pc.is_valid(staged.column("reason"))
    optional = [n for n in OPTIONAL_COLUMNS if with_optional and n in staged.column_names]
    schema = pa.schema(list(PAIR_SCHEMA) + [pa.field(n, OPTIONAL_COLUMNS[n]) for n in optional])
    kept = staged.filter(pc.invert(is_rejected)).select(list(PAIR_COLUMNS) + optional).cast(schema)
    rejected = staged.filter(is_rejected).select(REJECTED_SCHEMA.names).cast(REJECTED_SCHEMA)
    return kept, rejected


def rejected_rows(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Rejected row dicts (any subset of the columns) -> a :data:`REJECTED_SCHEMA` table."""
    rows = list(rows)
    return pa.Table.from_pydict({f.name: [r.get(f.name) for r in rows] for f in REJECTED_SCHEMA},
                                schema=REJECTED_SCHEMA)
