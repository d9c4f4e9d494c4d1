"""Pure-pyarrow reading and writing of prepared datasets (local or ``s3://``), without Ray.

Layout: ``ROOT/<domain>/<split>/*.parquet`` (contract rows), ``ROOT/rejected/*.parquet``,
``ROOT/_summary.json``, ``ROOT/tokenizer/``. The Ray Data counterparts live in
:mod:`date_core.runtime.dataio`; both resolve storage through :mod:`.storage`.
"""
from __future__ import annotations

import posixpath
import uuid
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from . import storage
from .schema import (
    PAIR_COLUMNS, PAIR_SCHEMA, REJECTED_DIR, REJECTED_SCHEMA, DataError, check_columns, check_pair_schema,
)

#: Rows per Parquet row group: ~10-50 MB of encoded images, small enough to stream, large
#: enough that per-group overhead does not matter.
ROW_GROUP_ROWS = 512
#: Columns that repeat a few values; dictionary encoding shrinks them, and only them (a
#: dictionary over JPEG bytes would cost time for nothing).
DICTIONARY_COLUMNS = ["domain", "split", "item_id"]


def pairs_uri(root: str, domain: str, split: str) -> str:
    """``ROOT/<domain>/<split>`` (local or s3)."""
    return storage.join(root, domain, split)


def parquet_files(uri: str) -> list[str]:
    """The ``*.parquet`` files under ``uri`` (paths inside its filesystem), sorted."""
    return storage.list_files(uri, ".parquet")


def list_datasets(root: str) -> list[tuple[str, str]]:
    """Every ``(domain, split)`` with at least one Parquet file under ``root``."""
    fs, base = storage.resolve_filesystem(root)
    found = set()
    for path in storage.list_files(root, ".parquet"):
        rel = posixpath.relpath(path, base).split("/")
        if len(rel) == 3 and rel[0] != REJECTED_DIR:
            found.add((rel[0], rel[1]))
    return sorted(found)


def _dataset(uri: str, where: str) -> pads.Dataset:
    fs, _ = storage.resolve_filesystem(uri)
    files = parquet_files(uri)
    if not files:
        raise DataError(where, "no Parquet files found")
    try:
        return pads.dataset(files, filesystem=fs, format="parquet")
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(where, f"unreadable Parquet: {exc}") from None


def read_table(root: str, domain: str, split: str, columns: Sequence[str] | None = None) -> pa.Table:
    """One prepared dataset as a pyarrow Table (all columns, or ``columns``).

    Raises :class:`DataError` naming the folder when there are no files, a file is not
    Parquet, or a contract column is missing.
    """
    uri = pairs_uri(root, domain, split)
    dataset = _dataset(uri, uri)
    if columns is None:
        check_pair_schema(dataset.schema, uri)
    else:
        check_columns(dataset.schema, columns, uri)
    try:
        return dataset.to_table(columns=list(columns) if columns else None)
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(uri, f"unreadable Parquet: {exc}") from None


def read_rejected(root: str) -> pa.Table:
    """All rejected rows of a prepared dataset (an empty table when nothing was rejected)."""
    uri = storage.join(root, REJECTED_DIR)
    if not parquet_files(uri):
        return REJECTED_SCHEMA.empty_table()
    return _dataset(uri, uri).to_table()


def write_parquet_file(table: pa.Table, uri_dir: str, prefix: str = "part") -> str:
    """Write ``table`` as one Parquet file with a unique name in ``uri_dir``; returns its path."""
    fs, path = storage.resolve_filesystem(uri_dir)
    storage.makedirs(uri_dir)
    name = f"{prefix}-{uuid.uuid4().hex[:12]}.parquet"
    target = posixpath.join(path, name)
    dict_cols = [c for c in DICTIONARY_COLUMNS if c in table.column_names]
    pq.write_table(table, target, filesystem=fs, row_group_size=ROW_GROUP_ROWS,
                   use_dictionary=dict_cols or False, compression="snappy")
    return target


def write_table(table: pa.Table, root: str, domain: str, split: str, rows_per_file: int | None = None) -> list[str]:
    """Write contract rows to ``ROOT/<domain>/<split>/`` in files of at most ``rows_per_file`` rows.

    The table is cast to :data:`PAIR_SCHEMA` (extra columns kept after the contract ones).
    """
    extra = [c for c in table.column_names if c not in PAIR_COLUMNS]
    check_columns(table.schema, PAIR_COLUMNS, f"table for {domain}/{split}")
    schema = pa.schema(list(PAIR_SCHEMA) + [table.schema.field(c) for c in extra])
    table = table.select(list(PAIR_COLUMNS) + extra).cast(schema)
    step = rows_per_file or max(table.num_rows, 1)
    uri = pairs_uri(root, domain, split)
    return [write_parquet_file(table.slice(i, step), uri) for i in range(0, max(table.num_rows, 1), step)]


def to_numpy_batch(table: pa.Table) -> dict[str, np.ndarray]:
    """A table -> ``dict[column, numpy array]`` in the layout Ray Data's ``batch_format="numpy"``
    gives (scalars as 1-D arrays, binary/strings/lists as object arrays), so
    :class:`~date_core.data.transforms.BatchTransform` sees the same input with or without Ray."""
    out: dict[str, np.ndarray] = {}
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
            out[name] = col.to_numpy()
        else:
            out[name] = np.asarray(col.to_pylist() + [None], dtype=object)[:-1]
    return out


def iter_numpy_batches(table: pa.Table, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Consecutive :func:`to_numpy_batch` batches of ``batch_size`` rows (the last may be smaller)."""
    for start in range(0, table.num_rows, batch_size):
        yield to_numpy_batch(table.slice(start, batch_size))
