"""Batch inference over a catalogue with a Ray Data actor pool: one model replica per GPU, or
one per CPU slot, each embedding whole dataset files into index shards.

    sources (dataset Parquet files without a current shard)
      -> ray.data.from_items(...)                          one row per file
      -> map_batches(ShardEmbedder, ActorPoolStrategy)     read, merge pairs per image, embed, write shard
      -> iter_rows() on the driver                         progress: images/s, ETA
      -> write_manifest (from the shards' footers)

A shard is the unit of resumption: a re-run embeds only files whose shard is missing or was
written by another model (:func:`date_core.retrieval.indexing.pending_sources`).
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pyarrow.parquet as pq
import ray

from date_core.retrieval import indexing
from date_core.data import storage


def pack_checkpoint(model_dir: str | Path) -> dict[str, bytes]:
    """A checkpoint folder as {relative path: bytes}, to ship to actors on any node."""
    root = Path(model_dir)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class ShardEmbedder:
    """Ray Data actor: a model replica that turns dataset files into index shards."""

    def __init__(self, checkpoint: "dict[str, bytes] | ray.ObjectRef", data: str, out: str, fingerprint: str,
                 batch_size: int, use_gpu: bool, torch_threads: int | None) -> None:
        import torch

        from date_core.inference import load_seeker

        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        if isinstance(checkpoint, ray.ObjectRef):  # shipped once through the object store
            checkpoint = ray.get(checkpoint)
        tmp = Path(tempfile.mkdtemp(prefix="date-index-model-"))
        try:  # the replica lives in memory; the unpacked folder is only needed to load it
            for name, blob in checkpoint.items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                (tmp / name).write_bytes(blob)
            device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
            self.seeker = load_seeker(tmp, device=device, batch_size=batch_size)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.data, self.out, self.fingerprint, self.batch_size = data, out, fingerprint, batch_size

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        done = {"source": [], "images": [], "seconds": []}
        for source in batch["source"]:
            start = time.perf_counter()
            table = indexing.embed_source(self.seeker, self.data, str(source), self.fingerprint, self.batch_size)
            indexing.write_shard(table, indexing.shard_uri(self.out, str(source)))
            done["source"].append(str(source))
            done["images"].append(table.num_rows)
            done["seconds"].append(time.perf_counter() - start)
        return {k: np.asarray(v) for k, v in done.items()}


def _rows(data: str, sources: Sequence[str]) -> dict[str, int]:
    """Pairs per source file, from the Parquet footers (the progress denominator)."""
    fs, base = storage.resolve_filesystem(data)
    return {s: pq.ParquetFile(fs.open_input_file(f"{base.rstrip('/')}/{s}")).metadata.num_rows for s in sources}


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def run_index(model_dir: str | Path, data: str, out: str, *, model_uri: str | None = None,
              datasets: Sequence[tuple[str, str]] | None = None, replicas: int | None = None,
              use_gpu: bool = False, batch_size: int = 64, torch_threads: int | None = 1,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Embed every image of ``data`` (all datasets, or ``datasets``) into an index at ``out``.

    ``replicas`` model replicas (default: the cluster's GPUs with ``use_gpu``, else its CPUs),
    each holding 1 GPU or 1 CPU. Returns the manifest.
    """
    model_dir = Path(model_dir)
    sources = indexing.source_files(data, datasets)
    fingerprint = indexing.model_fingerprint(model_dir)
    pending = indexing.pending_sources(out, sources, fingerprint)
    resources = ray.cluster_resources()
    if replicas is None:
        replicas = int(resources.get("GPU", 0)) if use_gpu else int(resources.get("CPU", 1))
    replicas = max(1, min(int(replicas), len(pending) or 1))
    log(f"[index] {len(sources)} dataset files, {len(sources) - len(pending)} already indexed by this model, "
        f"{len(pending)} to embed with {replicas} replica(s) on {'GPU' if use_gpu else 'CPU'}")
    meta = json.loads((model_dir / "config.json").read_text())["model"]
    if pending:
        rows = _rows(data, pending)
        total = sum(rows.values())
        ds = ray.data.from_items([{"source": s} for s in pending], override_num_blocks=len(pending))
        ds = ds.map_batches(
            ShardEmbedder, batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=replicas),
            fn_constructor_kwargs={"checkpoint": ray.put(pack_checkpoint(model_dir)), "data": data, "out": out,
                                   "fingerprint": fingerprint, "batch_size": batch_size, "use_gpu": use_gpu,
                                   "torch_threads": torch_threads},
            num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else 1)
        start, done_rows, images = time.perf_counter(), 0, 0
        for i, row in enumerate(ds.iter_rows(), 1):
            done_rows += rows[row["source"]]
            images += int(row["images"])
            elapsed = time.perf_counter() - start
            eta = elapsed * (total - done_rows) / max(done_rows, 1)
            log(f"[index] {i}/{len(pending)} files  {images:,} images  {images / max(elapsed, 1e-9):.1f} images/s  "
                f"ETA {_duration(eta)}")
    manifest = indexing.write_manifest(out, model=model_uri or str(model_dir), fingerprint=fingerprint,
                                       dim=int(meta["embed_dim"]), data=data, sources=sources,
                                       extra={"image_size": int(meta["image_size"])})
    norms = manifest["norms"]
    span = f"norms {norms['min']:.3f}..{norms['max']:.3f}" if manifest["count"] else "empty"
    log(f"[index] {manifest['count']:,} images, dim {manifest['dim']}, {span} -> {storage.join(out, indexing.MANIFEST)}")
    return manifest
