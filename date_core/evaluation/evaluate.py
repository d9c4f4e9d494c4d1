"""Evaluate a seeker checkpoint on a prepared dataset split, with the library alone (no Ray).

Used by ``pipelines/evaluate.py`` and by the training stages for their final metrics and
their prediction figures. Rows stream from Parquet in batches, so memory holds embeddings and
boxes, not images.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from date_core import batch as B
from date_core.data import io, storage
from date_core.data.transforms import BatchTransform
from date_core.training.engine import metrics_from_predictions, predict
from date_core.imaging import decode_image
from date_core.inference import load_model
from date_core.evaluation.metrics import dedupe_gallery, prefixed, topk_relevance
from date_core.text import load_tokenizer

_EVAL_COLUMNS = ["pair_id", "image_id", "image", "query", "box", "alt_boxes", "item_id"]


@dataclass
class Evaluation:
    """Metrics (prefixed ``<domain>_<split>/...``), recall at k = 1..10, and a few samples
    (images, queries, true and predicted boxes in original pixels) for a figure."""

    metrics: dict[str, float]
    recall_at: dict[int, float]
    samples: dict[str, Any] = field(default_factory=dict)


def split_batches(root: str, domain: str, split: str, transform: BatchTransform, batch_size: int,
                  limit: int | None):
    """(rows, batch) pairs of ``root/<domain>/<split>``, streamed from Parquet (first ``limit`` pairs)."""
    uri = io.pairs_uri(root, domain, split)
    fs, _ = storage.resolve_filesystem(uri)
    seen = 0
    for path in io.parquet_files(uri):
        for rb in pq.ParquetFile(fs.open_input_file(path)).iter_batches(batch_size=batch_size, columns=_EVAL_COLUMNS):
            if limit is not None and seen >= limit:
                return
            table = rb if limit is None else rb.slice(0, limit - seen)
            seen += table.num_rows
            rows = io.to_numpy_batch(pa.Table.from_batches([table]))
            yield rows, transform(rows)


def load_for_eval(model_dir: str | Path, root: str, device: str = "cpu") -> tuple[torch.nn.Module, BatchTransform]:
    """The checkpoint's model (eval mode) and its evaluation transform (its own tokenizer, else
    the dataset's)."""
    model = load_model(model_dir, device=device)
    tok_dir = Path(model_dir) / "tokenizer"
    tokenizer = load_tokenizer(tok_dir if tok_dir.is_dir() else storage.join(root, "tokenizer"))
    return model, BatchTransform(tokenizer, model.config.image_size, model.config.max_text_len, train=False)


def evaluate_split(model_dir: str | Path, root: str, domain: str, split: str, *, batch_size: int = 64,
                   limit: int | None = None, n_samples: int = 12, device: str = "cpu") -> Evaluation:
    """All PR + PG metrics of the checkpoint at ``model_dir`` on ``root/<domain>/<split>``."""
    model, transform = load_for_eval(model_dir, root, device)
    samples: dict[str, list] = {"images": [], "queries": [], "true": [], "pred": [], "orig": []}

    def model_batches():
        for rows, batch in split_batches(root, domain, split, transform, batch_size, limit):
            take = max(0, n_samples - len(samples["images"]))
            for i in range(min(take, len(rows["query"]))):
                samples["images"].append(decode_image(bytes(rows["image"][i])))
                samples["queries"].append(str(rows["query"][i]))
                samples["true"].append(batch[B.BOXES][i])
                samples["orig"].append(batch[B.ORIG_SIZE][i])
            yield batch

    pred = predict(model, model_batches(), device=device)
    metrics = metrics_from_predictions(pred)
    n = len(samples["images"])
    samples["pred"] = [pred["pred_boxes"][i].numpy() for i in range(n)]
    return Evaluation(prefixed(metrics, f"{domain}_{split}"), recall_curve(pred), samples)


def recall_curve(pred: dict[str, torch.Tensor], max_k: int = 10) -> dict[int, float]:
    """Recall@k for k = 1..``max_k`` (queries vs the deduplicated image gallery)."""
    n = pred["query_emb"].shape[0]
    image_key = pred.get(B.IMAGE_KEY, torch.arange(n))
    item_key = pred.get(B.ITEM_KEY, image_key)
    g_emb, _, g_item = dedupe_gallery(pred["image_emb"], image_key, item_key)
    rel, n_rel = topk_relevance(pred["query_emb"], item_key, g_emb, g_item, max_k)
    keep = n_rel > 0
    hits = rel[keep].cumsum(dim=1) > 0
    return {k + 1: float(hits[:, min(k, hits.shape[1] - 1)].float().mean()) if keep.any() else float("nan")
            for k in range(max_k)}


def samples_in_pixels(ev: Evaluation, image_size: int) -> tuple[list, list, list, list]:
    """The evaluation's samples with boxes mapped back to original pixels (x1, y1, x2, y2)."""
    from date_core.imaging import Letterbox, letterbox_cxcywh_to_xyxy_pixels

    s = ev.samples
    true_px, pred_px = [], []
    for t, p, (w, h) in zip(s["true"], s["pred"], s["orig"]):
        lb = Letterbox(float(w), float(h), image_size)
        true_px.append(letterbox_cxcywh_to_xyxy_pixels(np.asarray(t), lb))
        pred_px.append(letterbox_cxcywh_to_xyxy_pixels(np.asarray(p), lb))
    return s["images"], s["queries"], true_px, pred_px
