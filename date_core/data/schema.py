"""The Arrow schema of the data contract, the rejected-row schema, and the structural error.

One Parquet dataset per domain and split lives at ``ROOT/<domain>/<split>/*.parquet``; rows
that failed validation live at ``ROOT/rejected/*.parquet`` with a ``reason``; the run's counts
are in ``ROOT/_summary.json``; the query tokenizer in ``ROOT/tokenizer/``.
"""
from __future__ import annotations

from typing import Iterable

import pyarrow as pa

#: x1, y1, x2, y2 in pixels of the encoded image: always 4 values when not null (validation
#: enforces it). Stored as a variable-size list, not ``pa.list_(pa.float32(), 4)``: pyarrow 25
#: writes a null fixed-size list to Parquet but cannot read it back ("Expected all lists to be
#: of size=4 but index 1 had size=0"), and unannotated pairs (null ``box``) are the norm on the
#: target domain. ``tests/test_data_io.py`` pins the behaviour that matters: nulls round-trip.
BOX_TYPE = pa.list_(pa.float32())
#: Other boxes that also answer the query.
BOXES_TYPE = pa.list_(BOX_TYPE)

PAIR_SCHEMA = pa.schema([
    pa.field("pair_id", pa.string(), nullable=False),
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("image", pa.binary(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("query", pa.string(), nullable=False),
    pa.field("box", BOX_TYPE, nullable=True),
    pa.field("alt_boxes", BOXES_TYPE, nullable=True),
    pa.field("domain", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("item_id", pa.string(), nullable=False),
])
PAIR_COLUMNS: tuple[str, ...] = tuple(PAIR_SCHEMA.names)

#: The instance labels of a multi-product query: the products its image shows (Product1M's
#: ``#;#`` label field, "brand + product name" strings), in the source's order with repeats
#: kept (a set holding two of a product lists it twice; Product1M's official mAR weights each
#: label by how often it is listed, see :mod:`date_core.evaluation.metrics_instance`). Null when the
#: source has none. Relevance for instance-level retrieval: a gallery item is relevant to a
#: query when its label is one of these.
INSTANCE_IDS_TYPE = pa.list_(pa.string())

#: Optional columns a pair dataset may carry beyond the contract, with their types: a dataset
#: without them is valid; one with them must have these types (:func:`check_pair_schema`).
#: ``box_weight`` comes from pseudo-label joins; ``instance_ids`` from sources with instance
#: labels (``prepare product1m``).
OPTIONAL_COLUMNS = {"box_weight": pa.float32(), "instance_ids": INSTANCE_IDS_TYPE}

#: A rejected row keeps every contract field it could be read into (null where it could not),
#: where it came from (``source``: file and line/path), the original text of the row (``raw``),
#: and why it was rejected (``reason``: a short stable code; ``detail``: for humans).
REJECTED_SCHEMA = pa.schema([
    pa.field("pair_id", pa.string()),
    pa.field("image_id", pa.string()),
    pa.field("image", pa.binary()),
    pa.field("image_ref", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("query", pa.string()),
    pa.field("box", BOX_TYPE),
    pa.field("alt_boxes", BOXES_TYPE),
    pa.field("domain", pa.string()),
    pa.field("split", pa.string()),
    pa.field("item_id", pa.string()),
    pa.field("instance_ids", INSTANCE_IDS_TYPE),
    pa.field("source", pa.string()),
    pa.field("raw", pa.string()),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("detail", pa.string()),
])

SPLITS: tuple[str, ...] = ("train", "val", "test")
#: The split of an instance-level retrieval gallery (single-product images a multi-product
#: query retrieves, ``OUT/<domain>/gallery/``): a row may name it; it is never hash-assigned.
GALLERY_SPLIT = "gallery"
#: Every split name a row may carry.
ROW_SPLITS: tuple[str, ...] = SPLITS + (GALLERY_SPLIT,)
REJECTED_DIR = "rejected"
SUMMARY_FILE = "_summary.json"
TOKENIZER_DIR = "tokenizer"


class DataError(Exception):
    """A structural problem with an input or a dataset (missing column, unreadable file).

    Its message is one line naming the file and the problem; command-line tools print it
    without a traceback and exit non-zero. Row-level problems never raise: they are rejected.
    """

    def __init__(self, where: str, problem: str):
        self.where, self.problem = str(where), str(problem)
        super().__init__(f"{self.where}: {self.problem}")


def check_columns(schema: pa.Schema, required: Iterable[str], where: str) -> None:
    """Raise :class:`DataError` naming every column of ``required`` missing from ``schema``."""
    missing = [c for c in required if c not in schema.names]
    if missing:
        raise DataError(where, f"missing column(s) {', '.join(repr(c) for c in missing)}"
                               f" (has: {', '.join(schema.names) or 'none'})")


def check_pair_schema(schema: pa.Schema, where: str) -> None:
    """Raise :class:`DataError` when ``schema`` lacks a contract column, or has a contract or
    optional (:data:`OPTIONAL_COLUMNS`) column of the wrong kind."""
    check_columns(schema, PAIR_COLUMNS, where)
    fields = list(PAIR_SCHEMA) + [pa.field(n, t) for n, t in OPTIONAL_COLUMNS.items() if n in schema.names]
    for field in fields:
        got = schema.field(field.name).type
        if not _compatible(got, field.type):
            raise DataError(where, f"column {field.name!r} has type {got}, expected {field.type}")


def _compatible(got: pa.DataType, want: pa.DataType) -> bool:
    # Readers may hand back large_* or variable-size lists for the same logical type; the
    # physical variant does not matter to any consumer, only the logical kind does.
    if got.equals(want):
        return True
    kinds = [
        (pa.types.is_string, pa.types.is_large_string),
        (pa.types.is_binary, pa.types.is_large_binary),
    ]
    for a, b in kinds:
        if (a(want) or b(want)) and (a(got) or b(got)):
            return True
    if pa.types.is_integer(want) and pa.types.is_integer(got):
        return True
    listy = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)
    if any(f(want) for f in listy) and any(f(got) for f in listy):
        return _compatible(got.value_type, want.value_type) or (
            pa.types.is_floating(got.value_type) and pa.types.is_floating(want.value_type))
    return False


def empty_pairs() -> pa.Table:
    """A zero-row table with :data:`PAIR_SCHEMA`."""
    return PAIR_SCHEMA.empty_table()


def empty_rejected() -> pa.Table:
    """A zero-row table with :data:`REJECTED_SCHEMA`."""
    return REJECTED_SCHEMA.empty_table()
