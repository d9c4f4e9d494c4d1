"""Driver-side assembly of parsed records: duplicate ``pair_id``s, split assignment, sizing.

Source parsers (manifest, VOC, Product1M) yield one dict per input row: a *record* (see
:data:`~date_core.data.ingest.RECORD_SCHEMA`) or, for a row that could not even be parsed, a
rejected row (it carries ``reason``). :func:`assemble` streams them into compact Arrow
tables, so half a million rows never sit in memory as Python dicts.

Rules (the same for every source):
- the first row with a given ``pair_id`` wins; later ones are rejected ``duplicate_pair_id``;
- a row may name its split; the first named split of an image binds all its rows (a row that
  names another one is rejected ``split_conflict``); images with no named split get
  :func:`~date_core.data.splits.assign_split` of their ``image_id``.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
import pyarrow as pa

from . import storage
from .ingest import RECORD_SCHEMA, records_table, rejected_rows
from .splits import DEFAULT_FRACTIONS, assign_split
from .validate import DUPLICATE_PAIR_ID, SPLIT_CONFLICT

CHUNK_ROWS = 50_000


@dataclass
class Assembled:
    """Records ready for ingest (:data:`RECORD_SCHEMA`, split filled) and rows rejected while parsing."""

    records: pa.Table
    rejected: pa.Table
    read: int = 0
    sources: list[str] = field(default_factory=list)


def assemble(items: Iterable[Mapping[str, Any]], fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
             salt: str = "") -> Assembled:
    """Consume parser output (records and rejections) -> :class:`Assembled`."""
    seen: set[str] = set()
    named_split: dict[str, str] = {}
    chunks: list[pa.Table] = []
    buf: list[Mapping[str, Any]] = []
    rejected: list[Mapping[str, Any]] = []
    read = 0
    for item in items:
        read += 1
        if item.get("reason"):
            rejected.append(item)
            continue
        pid = item["pair_id"]
        if pid in seen:
            rejected.append({**item, "reason": DUPLICATE_PAIR_ID,
                             "detail": f"pair_id {pid!r} already used by an earlier row"})
            continue
        split, image_id = item.get("split"), item["image_id"]
        if split is not None:
            bound = named_split.setdefault(image_id, split)
            if bound != split:
                rejected.append({**item, "reason": SPLIT_CONFLICT,
                                 "detail": f"image {image_id!r} is already in split {bound!r}"})
                continue
        seen.add(pid)
        buf.append(item)
        if len(buf) >= CHUNK_ROWS:
            chunks.append(records_table(buf))
            buf = []
    if buf or not chunks:
        chunks.append(records_table(buf))
    table = pa.concat_tables(chunks)
    ids = table.column("image_id").to_pylist()
    given = table.column("split").to_pylist()
    splits = [s if s is not None else named_split.get(i) or assign_split(i, fractions, salt)
              for i, s in zip(ids, given)]
    table = table.set_column(table.schema.get_field_index("split"), "split", pa.array(splits, pa.string()))
    return Assembled(records=table.cast(RECORD_SCHEMA), rejected=rejected_rows(rejected), read=read)


def estimate_row_bytes(records: pa.Table, sample: int = 32, seed: int = 0) -> float:
    """Mean encoded image size of ``records`` from a random sample: in-hand bytes, else the
    size of the referenced files (local or s3). Used to size Parquet shards."""
    n = records.num_rows
    if n == 0:
        return 1.0
    idx = sorted(random.Random(seed).sample(range(n), min(sample, n)))
    sub = records.take(idx).select(["image", "image_ref"]).to_pylist()
    sizes = []
    for row in sub:
        if row["image"] is not None:
            sizes.append(len(row["image"]))
        elif row["image_ref"]:
            try:
                fs, path = storage.resolve_filesystem(row["image_ref"])
                info = fs.get_file_info(path)
                if info.size:
                    sizes.append(info.size)
            except (OSError, ValueError):
                pass  # a missing file is the ingest step's business, not the estimate's
    return float(np.mean(sizes)) + 200.0 if sizes else 50_000.0


def rows_per_file(est_row_bytes: float, target_mb: float) -> int:
    """Rows per Parquet file so that a file holds about ``target_mb`` MB."""
    return max(1, int(target_mb * 1e6 / max(est_row_bytes, 1.0)))
