"""A catalogue index: image embeddings as Parquet shards plus a manifest, local or ``s3://``.

Layout written by ``pipelines/index.py`` (the Ray Data actor pool is in
:mod:`date_core.runtime.indexer`; this module is the library part, no Ray)::

    OUT/index.json                     manifest: model URI and fingerprint, dimension, count, norms, shards
    OUT/embeddings/<shard>.parquet     one shard per source Parquet file of the dataset

A shard row is one image (pairs of the same image are merged): ``image_id``, ``item_id`` (its
first pair's product), ``item_ids`` (every product its pairs name), ``embedding`` (float32
``[D]``, L2-normalised), and where the image lives (``source``: the dataset file relative to
the data root, ``row``: its row there), so the searcher reads images only for the hits (:class:`ImageStore`).
Each shard's footer records the model fingerprint and its norm statistics, so the manifest is
assembled from footers alone, and a re-run knows which shards are current.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from date_core.data import io, storage
from date_core.imaging import decode_image

MANIFEST = "index.json"
SHARDS = "embeddings"
FORMAT = "date-index"
_SOURCE_COLUMNS = ["image_id", "image", "item_id"]


def index_schema(dim: int) -> pa.Schema:
    """The Arrow schema of an index shard with ``dim``-dimensional embeddings."""
    return pa.schema([
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("item_ids", pa.list_(pa.string()), nullable=False),
        pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("row", pa.int64(), nullable=False),
    ])


def model_fingerprint(model_dir: str | Path) -> str:
    """A short hash of a checkpoint's weights: shards embedded by another model are stale."""
    h = hashlib.sha256()
    with open(Path(model_dir) / "model.safetensors", "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def source_files(data: str, datasets: Sequence[tuple[str, str]] | None = None) -> list[str]:
    """The dataset's Parquet files (relative to ``data``), sorted, of the given (domain, split)s
    or of every dataset under ``data``."""
    found = list(datasets) if datasets else io.list_datasets(data)
    if not found:
        raise FileNotFoundError(f"no prepared dataset under {data} (expected <domain>/<split>/*.parquet; "
                                "run pipelines/prepare.py)")
    _, base = storage.resolve_filesystem(data)
    files = []
    for domain, split in found:
        paths = io.parquet_files(io.pairs_uri(data, domain, split))
        if not paths:
            raise FileNotFoundError(f"no Parquet files for {domain}/{split} under {data}")
        files += [posixpath.relpath(p, base) for p in paths]
    return sorted(files)


def shard_name(source: str) -> str:
    """``mall/test/part-0.parquet`` -> ``mall__test__part-0.parquet`` (one shard per source file)."""
    return source.replace("/", "__")


def shard_uri(out: str, source: str) -> str:
    return storage.join(out, SHARDS, shard_name(source))


def read_source(data: str, source: str) -> pa.Table:
    """The columns of one dataset file that indexing needs."""
    fs, base = storage.resolve_filesystem(data)
    return pq.read_table(posixpath.join(base, source), columns=_SOURCE_COLUMNS, filesystem=fs)


def merge_images(table: pa.Table) -> tuple[np.ndarray, list[list[str]]]:
    """Rows of the first pair of each image, and every item each image's pairs name.
    ``table`` has ``image_id`` and ``item_id`` -> (int64 ``[I]`` row indices, ``I`` item lists)."""
    image_ids = table.column("image_id").to_pylist()
    item_ids = table.column("item_id").to_pylist()
    first: dict[str, int] = {}
    items: dict[str, list[str]] = {}
    for row, (image, item) in enumerate(zip(image_ids, item_ids)):
        first.setdefault(image, row)
        seen = items.setdefault(image, [])
        if item not in seen:
            seen.append(item)
    return np.fromiter(first.values(), np.int64, len(first)), [items[i] for i in first]


def embed_source(seeker, data: str, source: str, fingerprint: str, batch_size: int = 64) -> pa.Table:
    """Embed the images of one dataset file -> an index shard table (footer: fingerprint, norms)."""
    table = read_source(data, source)
    rows, items = merge_images(table)
    images = table.column("image").take(pa.array(rows))
    emb = np.zeros((len(rows), seeker.model.config.embed_dim), np.float32)
    for start in range(0, len(rows), batch_size):
        chunk = [decode_image(b) for b in images.slice(start, batch_size).to_pylist()]
        emb[start:start + len(chunk)] = seeker.encode_images(chunk)
    norms = np.linalg.norm(emb, axis=1) if len(emb) else np.zeros(0)
    dim = emb.shape[1]
    out = pa.table({
        "image_id": table.column("image_id").take(pa.array(rows)).cast(pa.string()),
        "item_id": pa.array([i[0] for i in items], pa.string()),
        "item_ids": pa.array(items, pa.list_(pa.string())),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), dim),
        "source": pa.array([source] * len(rows), pa.string()),
        "row": pa.array(rows, pa.int64()),
    }, schema=index_schema(dim))
    stats = {"fingerprint": fingerprint, "count": len(rows), "norm_min": float(norms.min()) if len(norms) else None,
             "norm_max": float(norms.max()) if len(norms) else None, "norm_sum": float(norms.sum())}
    return out.replace_schema_metadata({"date_index": json.dumps(stats)})


def write_shard(table: pa.Table, uri: str) -> None:
    """Write one shard so that a reader never sees half of it: a local file is written next to
    its final name and renamed; an S3 object appears only when its upload completes."""
    fs, path = storage.resolve_filesystem(uri)
    if storage.is_s3(uri):
        pq.write_table(table, path, filesystem=fs)
        return
    fs.create_dir(posixpath.dirname(path), recursive=True)
    tmp = f"{path}.tmp-{time.time_ns()}"
    pq.write_table(table, tmp, filesystem=fs)
    fs.move(tmp, path)


def shard_stats(uri: str) -> dict[str, Any] | None:
    """The footer statistics of a written shard, or None when it does not exist or is unreadable."""
    fs, path = storage.resolve_filesystem(uri)
    try:
        meta = pq.read_schema(path, filesystem=fs).metadata or {}
        return json.loads(meta[b"date_index"])
    except (FileNotFoundError, OSError, KeyError, ValueError, pa.ArrowInvalid):
        return None


def pending_sources(out: str, sources: Sequence[str], fingerprint: str) -> list[str]:
    """The sources whose shard is missing, unreadable or embedded by another model."""
    return [s for s in sources if (shard_stats(shard_uri(out, s)) or {}).get("fingerprint") != fingerprint]


def write_manifest(out: str, *, model: str, fingerprint: str, dim: int, data: str,
                   sources: Sequence[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Assemble ``OUT/index.json`` from the shards' footers (raises if a shard is missing or stale)."""
    shards, count, total, lo, hi = [], 0, 0.0, float("inf"), 0.0
    for source in sources:
        stats = shard_stats(shard_uri(out, source))
        if stats is None or stats["fingerprint"] != fingerprint:
            raise RuntimeError(f"index shard for {source} is missing or stale at {shard_uri(out, source)}")
        shards.append({"file": f"{SHARDS}/{shard_name(source)}", "source": source, "count": stats["count"]})
        count += stats["count"]
        total += stats["norm_sum"]
        if stats["count"]:
            lo, hi = min(lo, stats["norm_min"]), max(hi, stats["norm_max"])
    manifest = {"format": FORMAT, "format_version": 1, "model": model, "model_fingerprint": fingerprint,
                "dim": dim, "count": count, "data": data,
                "norms": {"min": lo if count else None, "max": hi if count else None,
                          "mean": total / count if count else None},
                "shards": shards, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(extra or {})}
    storage.write_bytes(storage.join(out, MANIFEST), json.dumps(manifest, indent=2).encode())
    return manifest


@dataclass
class CatalogueIndex:
    """A loaded index: ``embeddings [N, D]`` float32 (one row per distinct image), its keys, and
    the manifest. ``ann`` holds an approximate index once :meth:`build_ann` ran."""

    embeddings: np.ndarray
    image_id: list[str]
    item_id: list[str]
    item_ids: list[list[str]]
    source: list[str]
    row: np.ndarray
    manifest: dict[str, Any]
    ann: Any = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.image_id)

    def build_ann(self, kind: str = "hnsw", **kwargs) -> None:
        """Build an approximate index (:class:`date_core.retrieval.search.ApproxIndex`) over the embeddings."""
        from date_core.retrieval.search import ApproxIndex

        self.ann = ApproxIndex.build(self.embeddings, kind, **kwargs)

    def search(self, queries: np.ndarray, k: int = 10, *, approximate: bool = False
               ) -> tuple[np.ndarray, np.ndarray]:
        """``queries [Q, D]`` -> (``[Q, k]`` scores, ``[Q, k]`` rows of this index), exact unless
        ``approximate`` (then :meth:`build_ann` first, or it is built with its defaults)."""
        from date_core.retrieval.search import exact_search

        if approximate:
            if self.ann is None:
                self.build_ann()
            return self.ann.search(queries, k)
        return exact_search(queries, self.embeddings, k)


def load_index(index: str) -> CatalogueIndex:
    """Read ``OUT/index.json`` and every shard it lists; an image in several shards is kept once."""
    path = storage.join(index, MANIFEST)
    if not storage.exists(path):
        raise FileNotFoundError(f"no index at {index} (no {MANIFEST}): build one with pipelines/index.py")
    manifest = json.loads(storage.read_bytes(path))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} manifest")
    fs, base = storage.resolve_filesystem(index)
    tables = [pq.read_table(posixpath.join(base, s["file"]), filesystem=fs) for s in manifest["shards"]]
    table = pa.concat_tables(tables) if tables else index_schema(int(manifest["dim"])).empty_table()
    return index_from_table(table, manifest)


def index_from_table(table: pa.Table, manifest: dict[str, Any]) -> CatalogueIndex:
    """Shard rows (:func:`index_schema`) -> a :class:`CatalogueIndex`, an image kept once."""
    from date_core.retrieval.search import unique_rows

    table = table.take(pa.array(unique_rows(table.column("image_id").to_pylist())))
    emb = table.column("embedding").combine_chunks()
    dim = table.schema.field("embedding").type.list_size
    embeddings = emb.values.to_numpy(zero_copy_only=False).reshape(len(table), dim)
    return CatalogueIndex(np.ascontiguousarray(embeddings, np.float32), table.column("image_id").to_pylist(),
                          table.column("item_id").to_pylist(), table.column("item_ids").to_pylist(),
                          table.column("source").to_pylist(), table.column("row").to_numpy(), manifest)


class ImageStore:
    """Reads indexed images back from their dataset files, keeping the image column of the
    ``cache_files`` most recently used files (a search touches few files, many times)."""

    def __init__(self, data: str, cache_files: int = 4) -> None:
        self.data = data
        self.cache_files = int(cache_files)
        self._columns: dict[str, pa.ChunkedArray] = {}

    def _column(self, source: str) -> pa.ChunkedArray:
        if source in self._columns:
            self._columns[source] = self._columns.pop(source)  # most recent last
        else:
            fs, base = storage.resolve_filesystem(self.data)
            self._columns[source] = pq.read_table(posixpath.join(base, source), columns=["image"],
                                                  filesystem=fs).column("image")
            while len(self._columns) > self.cache_files:
                self._columns.pop(next(iter(self._columns)))
        return self._columns[source]

    def get(self, sources: Sequence[str], rows: Sequence[int]) -> list:
        """The PIL images at (source file, row) pairs, in order."""
        return [decode_image(self._column(s)[int(r)].as_py()) for s, r in zip(sources, rows)]

