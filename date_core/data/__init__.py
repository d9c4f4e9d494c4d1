"""The data layer: contract schema, validation, sources, storage, readers and the batch transform.

Modules (none imports ray; the Ray Data glue is :mod:`date_core.runtime.dataio`):

- :mod:`.schema`     Arrow schema of the data contract and of rejected rows; :class:`DataError`.
- :mod:`.storage`    ``resolve_filesystem(uri) -> (pyarrow fs, path)`` for local paths and ``s3://``.
- :mod:`.io`         pure-pyarrow ``read_table(root, domain, split)`` / ``write_table`` / numpy batches.
- :mod:`.validate`   row checks and reason codes; :mod:`.ingest` load + decode + validate a batch.
- :mod:`.splits`     deterministic split by a hash of ``image_id``.
- :mod:`.manifest`, :mod:`.voc`, :mod:`.product1m`: source parsers; :mod:`.assemble` dedup + splits.
- :mod:`.summary`    read / kept / rejected counts (``_summary.json``).
- :mod:`.transforms` ``BatchTransform``: contract rows -> model batch (:mod:`date_core.batch`).
- :mod:`.productworld` the synthetic generator.
"""
from __future__ import annotations

from typing import Any

_EXPORTS = {
    "PAIR_SCHEMA": "schema", "REJECTED_SCHEMA": "schema", "DataError": "schema",
    "resolve_filesystem": "storage", "read_table": "io", "write_table": "io",
    "read_rejected": "io", "list_datasets": "io", "read_summary": "summary",
    "assign_split": "splits", "BatchTransform": "transforms",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    # Lazy: importing the data package must not pull transformers in (BatchTransform does).
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(name)
