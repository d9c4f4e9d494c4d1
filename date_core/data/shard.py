"""An in-process stand-in for a Ray Data shard of model batches.

:class:`TableShard` turns contract rows (a pyarrow table) into model batches with the same
:class:`~date_core.data.transforms.BatchTransform` the Ray pipeline maps over its blocks, in
blocks of the same size, and offers them through Ray Data's ``iter_torch_batches`` interface, so
the worker-loop skeleton (:func:`date_core.training.loop.run_epochs`) and the round engine
(:class:`date_core.adapt.round.RoundEngine`) run unchanged without Ray (the PG-DA benchmark).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import torch

from .io import to_numpy_batch

#: rows per transform call: the block size of the pipeline's ``map_batches`` (runtime.dataio)
BLOCK_ROWS = 64


class TableShard:
    """``table``'s rows through ``transform`` (a :class:`BatchTransform`), ``rows_fn`` applied
    to each block of raw rows first (e.g. the pseudo-box join,
    :func:`date_core.adapt.pseudo.join_pseudo`).

    Without a shuffle buffer the rows come in table order (Ray Data's order for one file read
    with ``preserve_order``); with one, each epoch takes a fresh permutation seeded by
    ``local_shuffle_seed``: an order as random as the pipeline's file shuffle plus its local
    buffer, though not the same order."""

    def __init__(self, table: pa.Table, transform: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
                 rows_fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
                 block_rows: int = BLOCK_ROWS):
        if table.num_rows == 0:
            raise ValueError("TableShard got an empty table")
        self.table, self.transform, self.rows_fn, self.block_rows = table, transform, rows_fn, int(block_rows)

    def __len__(self) -> int:
        return self.table.num_rows

    def iter_torch_batches(self, *, batch_size: int, drop_last: bool = False,
                           local_shuffle_buffer_size: int | None = None,
                           local_shuffle_seed: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of ``batch_size`` pairs (tensors, :mod:`date_core.batch` keys)."""
        n = self.table.num_rows
        order = (np.random.default_rng(local_shuffle_seed).permutation(n) if local_shuffle_buffer_size
                 else np.arange(n))
        pending: dict[str, np.ndarray] | None = None
        for start in range(0, n, self.block_rows):
            rows = to_numpy_batch(self.table.take(pa.array(order[start:start + self.block_rows])))
            if self.rows_fn is not None:
                rows = self.rows_fn(rows)
            block = self.transform(rows)
            pending = block if pending is None else {k: np.concatenate([pending[k], block[k]]) for k in block}
            while _rows(pending) >= batch_size:
                yield _tensors(pending, slice(0, batch_size))
                pending = {k: v[batch_size:] for k, v in pending.items()}
        if pending is not None and _rows(pending) and not drop_last:
            yield _tensors(pending, slice(0, None))


def _rows(batch: dict[str, np.ndarray]) -> int:
    return int(next(iter(batch.values())).shape[0])


def _tensors(batch: dict[str, Any], sel: slice) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(np.ascontiguousarray(v[sel])) for k, v in batch.items()}


__all__ = ["TableShard", "BLOCK_ROWS"]
