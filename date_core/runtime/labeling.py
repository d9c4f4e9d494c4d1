"""Pseudo-labelling the target set with a Ray Data actor pool, and committing the labels.

Per batch, an actor (one model replica per GPU, or per CPU slot) runs the pseudo box
generator's views (:func:`date_core.adapt.pseudo.predict_views`); the driver then scores all
pairs together (retrieval consistency needs the whole target gallery), keeps the round's most
reliable fraction and writes one row per target pair (kept or not) to Parquet.

Labels are never half-written: the files go to a fresh ``attempt-<id>/`` folder and a single
``_COMMITTED.json`` object (atomic on a local disk and on S3) names the attempt that counts.
"""
from __future__ import annotations

import json
import os
import posixpath
import uuid
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy

from date_core.adapt.pseudo import TARGET_COLUMNS, concat_predictions, join_pseudo, pseudo_lookup
from date_core.adapt.selftrain import LabelRound, RowLabeler, focus_zoom_of, select_round, sensitivity_pass_of
from date_core.data import io, storage
from date_core.runtime.watchdog import watched

COMMIT_FILE = "_COMMITTED.json"


class TargetLabeler(RowLabeler):
    """Ray Data actor: the :class:`~date_core.adapt.selftrain.RowLabeler` of a saved model."""

    def __init__(self, model_dir: str, tokenizer: str, views: list[str], consensus: str, use_gpu: bool,
                 sensitivity: bool = True, focus_zoom: float | None = None, torch_threads: int | None = None):
        import torch

        from date_core.data.transforms import BatchTransform
        from date_core.inference import load_model

        if torch_threads:  # Ray sets OMP_NUM_THREADS to the actor's CPUs, so torch would use that many
            torch.set_num_threads(int(torch_threads))
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        with storage.local_dir(model_dir) as local:
            model = load_model(local, device=device)
        cfg = model.config
        super().__init__(model, BatchTransform(tokenizer, cfg.image_size, cfg.max_text_len, train=False), views,
                         consensus, sensitivity, focus_zoom)


def label_threads(adapt: Mapping[str, Any]) -> int:
    """Torch threads of a labelling actor: ``adapt.label_threads``, or (null) its reserved
    ``adapt.label_cpus``, at least 1."""
    threads = adapt.get("label_threads")
    if threads is None:
        threads = max(1, int(float(adapt["label_cpus"])))
    if int(threads) < 1:
        raise ValueError(f"adapt.label_threads must be >= 1 or null, got {threads}")
    return int(threads)


def label_target(cfg: Mapping[str, Any], model_dir: str, tokenizer: str, round_index: int) -> LabelRound:
    """Predict, score and select over the whole target train split; returns the round."""
    data, adapt, rt = cfg["data"], cfg["adapt"], cfg["runtime"]
    from date_core.runtime.dataio import read_pairs

    rows = read_pairs(data["root"], data["target_domain"], data["train_split"])
    use_gpu = bool(rt["use_gpu"])
    preds = rows.map_batches(
        TargetLabeler, batch_size=int(adapt["label_batch_size"]), batch_format="numpy",
        fn_constructor_kwargs=dict(model_dir=str(model_dir), tokenizer=tokenizer, views=list(adapt["views"]),
                                   consensus=adapt["consensus"], use_gpu=use_gpu,
                                   sensitivity=sensitivity_pass_of(adapt),
                                   focus_zoom=focus_zoom_of(adapt), torch_threads=label_threads(adapt)),
        compute=ActorPoolStrategy(size=int(adapt["label_actors"])),
        num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else float(adapt["label_cpus"]),
    )
    parts = list(watched(preds.iter_batches(batch_size=None, batch_format="numpy"), "labelling",
                         float(rt["stall_timeout_s"]), what="labelled batch"))
    return select_round(concat_predictions(parts), round_index, adapt)


def commit_pseudo(table: pa.Table, folder: str) -> str:
    """Write ``table`` under ``folder/attempt-<id>/`` and then commit it; returns the file."""
    attempt = storage.join(folder, f"attempt-{uuid.uuid4().hex[:12]}")
    path = storage.join(attempt, posixpath.basename(io.write_parquet_file(table, attempt)))
    atomic_write(storage.join(folder, COMMIT_FILE),
                 json.dumps({"attempt": attempt, "file": path, "rows": table.num_rows}).encode())
    return path


def atomic_write(uri: str, data: bytes) -> None:
    """Write a small file all-or-nothing: one PUT on S3, write-then-rename on a local disk."""
    if storage.is_s3(uri):
        storage.write_bytes(uri, data)
        return
    tmp = f"{uri}.tmp-{uuid.uuid4().hex[:8]}"
    storage.write_bytes(tmp, data)
    os.replace(tmp, uri)


def read_pseudo(folder: str) -> pa.Table | None:
    """The committed pseudo-labels of ``folder``, or None when none were committed."""
    marker = storage.join(folder, COMMIT_FILE)
    if not storage.exists(marker):
        return None
    meta = json.loads(storage.read_bytes(marker))
    fs, path = storage.resolve_filesystem(meta["file"])
    import pyarrow.parquet as pq

    return pq.read_table(path, filesystem=fs)


def target_with_pseudo(cfg: Mapping[str, Any], labels: pa.Table | None,
                       num_cpus: float | None = None) -> ray.data.Dataset:
    """The target train rows with their hidden boxes removed and, when ``labels`` is given, the
    kept pseudo boxes (and weights) joined in by ``pair_id``; tasks of ``num_cpus`` (default 1)."""
    from date_core.runtime.dataio import read_pairs

    data = cfg["data"]
    ds = read_pairs(data["root"], data["target_domain"], data["train_split"], columns=list(TARGET_COLUMNS),
                    num_cpus=num_cpus)
    if labels is None:
        return ds
    ref = ray.put(pseudo_lookup(labels))
    return ds.map_batches(_join_pseudo, batch_format="numpy", fn_kwargs={"lookup": ref},
                          num_cpus=1.0 if num_cpus is None else float(num_cpus))


def _join_pseudo(rows: dict[str, np.ndarray], lookup) -> dict[str, np.ndarray]:
    """:func:`~date_core.adapt.pseudo.join_pseudo` with the lookup shipped once through the object store."""
    return join_pseudo(rows, ray.get(lookup) if isinstance(lookup, ray.ObjectRef) else lookup)
