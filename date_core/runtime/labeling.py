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

from date_core.adapt.pseudo import concat_predictions
from date_core.adapt.selftrain import LabelRound, focus_zoom_of, select_round, sensitivity_pass_of
from date_core.data import io, storage
from date_core.runtime.watchdog import watched

COMMIT_FILE = "_COMMITTED.json"
PSEUDO_SCHEMA = pa.schema([
    ("pair_id", pa.string()), ("box", pa.list_(pa.float32())), ("box_weight", pa.float32()),
    ("score", pa.float32()), ("kept", pa.bool_()), ("agreement", pa.float32()),
    ("confidence", pa.float32()), ("sensitivity", pa.float32()), ("round", pa.int32()),
])


class TargetLabeler:
    """Ray Data actor: contract rows -> per-pair predictions under the configured views."""

    def __init__(self, model_dir: str, tokenizer: str, views: list[str], consensus: str, use_gpu: bool,
                 sensitivity: bool = True, focus_zoom: float | None = None, torch_threads: int | None = None):
        import torch

        from date_core.adapt.views import build_views
        from date_core.data.transforms import BatchTransform
        from date_core.inference import load_model

        if torch_threads:  # Ray sets OMP_NUM_THREADS to the actor's CPUs, so torch would use that many
            torch.set_num_threads(int(torch_threads))
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        with storage.local_dir(model_dir) as local:
            self.model = load_model(local, device=device)
        cfg = self.model.config
        self.transform = BatchTransform(tokenizer, cfg.image_size, cfg.max_text_len, train=False)
        self.views = build_views(views)
        self.consensus = consensus
        self.sensitivity = sensitivity
        self.focus_zoom = focus_zoom

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from date_core.adapt.pseudo import predict_views

        batch = self.transform(rows)
        out = predict_views(self.model, batch, self.views, consensus=self.consensus,
                            keep_annotations="box" in rows,  # hidden boxes: precision only
                            sensitivity=self.sensitivity, focus_zoom=self.focus_zoom)
        out["pair_id"] = np.asarray(rows["pair_id"], dtype=object)
        return out


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


def pseudo_table(rnd: LabelRound) -> pa.Table:
    """One row per target pair: the consensus box in original pixels (null when not kept), its
    loss weight (reliability / best kept reliability), the raw score and the kept flag."""
    from date_core.imaging import Letterbox, letterbox_cxcywh_to_xyxy_pixels

    p = rnd.predictions
    n = rnd.keep.shape[0]
    top = float(rnd.reliability[rnd.keep].max()) if rnd.keep.any() else 1.0
    sizes = np.asarray(p["orig_size"], dtype=np.float64)
    boxes = [letterbox_cxcywh_to_xyxy_pixels(b, Letterbox(float(w), float(h), 1)).tolist() if k else None
             for b, (w, h), k in zip(p["box"], sizes, rnd.keep)]
    return pa.table({
        "pair_id": pa.array([str(x) for x in p["pair_id"]], pa.string()),
        "box": pa.array(boxes, pa.list_(pa.float32())),
        "box_weight": pa.array(np.where(rnd.keep, rnd.reliability / max(top, 1e-12), 0.0).astype(np.float32)),
        "score": pa.array(rnd.reliability.astype(np.float32)),
        "kept": pa.array(rnd.keep),
        "agreement": pa.array(np.asarray(p["agreement"], np.float32)),
        "confidence": pa.array(np.asarray(p["confidence"], np.float32)),
        "sensitivity": pa.array(np.asarray(p.get("sensitivity", np.full(n, np.nan)), np.float32)),
        "round": pa.array(np.full(n, rnd.round_index, np.int32)),
    }, schema=PSEUDO_SCHEMA)


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
    cols = ["pair_id", "image_id", "image", "width", "height", "query", "domain", "split", "item_id"]
    ds = read_pairs(data["root"], data["target_domain"], data["train_split"], columns=cols, num_cpus=num_cpus)
    if labels is None:
        return ds
    kept = labels.filter(labels["kept"])
    lookup = {pid: (box, w) for pid, box, w in zip(kept["pair_id"].to_pylist(), kept["box"].to_pylist(),
                                                  kept["box_weight"].to_pylist())}
    ref = ray.put(lookup)
    return ds.map_batches(_join_pseudo, batch_format="numpy", fn_kwargs={"lookup": ref},
                          num_cpus=1.0 if num_cpus is None else float(num_cpus))


def _join_pseudo(rows: dict[str, np.ndarray], lookup) -> dict[str, np.ndarray]:
    if isinstance(lookup, ray.ObjectRef):  # shipped once through the object store
        lookup = ray.get(lookup)
    hits = [lookup.get(str(pid)) for pid in rows["pair_id"]]
    # a float [n, 4] column, NaN where a pair has no pseudo box (the transform reads NaN as none):
    # an object column of arrays and Nones made Ray Data fall back to pickling, with a warning
    # on the job's terminal for every block
    boxes = np.full((len(hits), 4), np.nan, np.float32)
    for i, h in enumerate(hits):
        if h is not None:
            boxes[i] = np.asarray(h[0], np.float32)
    rows["box"] = boxes
    rows["box_weight"] = np.asarray([0.0 if h is None else float(h[1]) for h in hits], np.float32)
    return rows
