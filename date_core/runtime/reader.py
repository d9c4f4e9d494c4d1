"""Reading a prepared dataset with Ray Data, one read task per Parquet row-group range.

The driver plans *read units* from the files' footers (``file``, first row group, number of row
groups); Ray Data then reads each unit in a ``map_batches`` task whose CPU request the caller
sets. Two reasons not to use ``ray.data.read_parquet``:

- its file-listing step (Ray Data 2.60) always asks for one whole CPU, so a stream confined to
  a fractional CPU budget (:mod:`date_core.runtime.budget`) could never start;
- a file is no longer the unit of parallelism: a large Parquet file spreads over every task.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data import Dataset

from date_core.data import io, storage
from date_core.data.schema import DataError, check_pair_schema


@dataclass(frozen=True)
class ReadUnit:
    """Row groups ``first .. first + count - 1`` of one Parquet file of the dataset at ``uri``."""

    uri: str        # the dataset folder (local or s3://): the task resolves its filesystem from it
    path: str       # the file, inside that filesystem
    first: int
    count: int
    rows: int


def plan_units(uri: str, *, groups_per_unit: int = 1, check_schema: bool = True) -> list[ReadUnit]:
    """The read units of the Parquet files under ``uri``, in file order.

    Raises :class:`DataError` when there is no Parquet file, a footer is unreadable or (with
    ``check_schema``) the schema lacks a contract column.
    """
    fs, _ = storage.resolve_filesystem(uri)
    files = io.parquet_files(uri)
    if not files:
        raise DataError(uri, "no Parquet files found")
    units = []
    for i, path in enumerate(files):
        try:
            meta = pq.ParquetFile(path, filesystem=fs).metadata
        except (OSError, pa.ArrowInvalid) as exc:
            raise DataError(path, f"unreadable Parquet: {exc}") from None
        if check_schema and i == 0:
            check_pair_schema(meta.schema.to_arrow_schema(), path)
        for first in range(0, meta.num_row_groups, groups_per_unit):
            count = min(groups_per_unit, meta.num_row_groups - first)
            rows = sum(meta.row_group(g).num_rows for g in range(first, first + count))
            if rows:
                units.append(ReadUnit(uri, path, first, count, rows))
    return units


def read_units(batch: Mapping[str, np.ndarray], columns: Sequence[str] | None = None) -> pa.Table:
    """A Ray Data task: the rows of the units in ``batch`` (one column per :class:`ReadUnit` field)."""
    tables = []
    for uri, path, first, count in zip(batch["uri"], batch["path"], batch["first"], batch["count"]):
        fs, _ = storage.resolve_filesystem(str(uri))
        with fs.open_input_file(str(path)) as fh:
            groups = list(range(int(first), int(first) + int(count)))
            tables.append(pq.ParquetFile(fh).read_row_groups(groups, columns=list(columns) if columns else None))
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def read_pairs(root: str, domain: str, split: str, *, columns: Sequence[str] | None = None,
               shuffle_files: bool = False, override_num_blocks: int | None = None,
               num_cpus: float | None = None, seed: int | None = None) -> Dataset:
    """The prepared dataset ``ROOT/<domain>/<split>`` as a Ray Dataset (lazy, streaming).

    ``num_cpus``: CPUs each read task asks for (default 1; a fraction inside a stream budget).
    ``shuffle_files``: the read units in a random order (``seed``; none = a fresh order).
    ``override_num_blocks``: at most this many read tasks (units are grouped; default one
    task per row group).

    Raises :class:`DataError` when the folder has no Parquet file or (``columns`` unset) its
    schema lacks a contract column, before any task starts.
    """
    uri = io.pairs_uri(root, domain, split)
    units = plan_units(uri, check_schema=columns is None)
    if shuffle_files:
        random.Random(seed).shuffle(units)
    items = [{"uri": u.uri, "path": u.path, "first": u.first, "count": u.count} for u in units]
    blocks = len(items) if not override_num_blocks else max(1, min(len(items), int(override_num_blocks)))
    return ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        read_units, batch_size=None, batch_format="numpy", fn_kwargs={"columns": columns},
        num_cpus=1.0 if num_cpus is None else float(num_cpus),
    )


def count_rows(root: str, domain: str, split: str) -> int:
    """Rows of ``ROOT/<domain>/<split>`` from the Parquet footers alone (nothing is decoded)."""
    return sum(u.rows for u in plan_units(io.pairs_uri(root, domain, split), check_schema=False))


__all__ = ["ReadUnit", "plan_units", "read_units", "read_pairs", "count_rows"]

