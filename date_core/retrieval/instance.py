"""Instance-level retrieval (Product1M's task) with DATE's extractors.

A *query* is a multi-product image with its caption; the *gallery* holds single-product
images; a gallery item is relevant when its product is one of the query's ``instance_ids``
(:mod:`date_core.evaluation.metrics_instance` scores the rankings). Both sides go through the model's own
extractors, nothing is trained here:

- caption -> gallery image: ``encode_text(caption)["emb"] . encode_image(item)["emb"]``, DATE's
  retrieval direction (a caption names some of the products);
- query image -> gallery image: either the pooled image embedding (``image_pool="mean"``), or,
  for a :class:`~date_core.model.DateModel`, each of its K concentrated semantic tokens through
  the image head (``"tokens"``), scored by the best-matching token: a multi-product image's mean
  blends its products, while a token that concentrates on one product can match that product's
  gallery photo on its own.

``score = text_weight * caption_sim + (1 - text_weight) * image_sim``; ``text_weight`` is chosen
on a validation split (:func:`choose_text_weight`), never on the test split.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor, nn

from date_core import batch as B
from date_core.evaluation.metrics_instance import instance_retrieval_metrics

IMAGE_POOLS = ("mean", "tokens")
#: ``text_weight`` values tried on the validation split.
TEXT_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class QueryFeatures:
    """Encoded queries: ``text [Q, D]``, ``image [Q, D]`` and, from a DATE model,
    ``tokens [Q, K, D]`` (each semantic token through the image head); all L2-normalised."""

    text: Tensor
    image: Tensor
    tokens: Tensor | None = None


def _token_embeddings(model: nn.Module, enc: Mapping[str, Any]) -> Tensor | None:
    retrieval = getattr(model, "retrieval", None)
    if retrieval is None or "tokens" not in enc:
        return None
    return retrieval.embed_image_tokens(enc["tokens"])


@torch.no_grad()
def encode_gallery(model: nn.Module, batches: Iterable[Mapping[str, Any]], device: str | torch.device = "cpu") -> Tensor:
    """Single-product image batches (``pixel_values``) -> gallery embeddings ``[G, D]`` (float32, CPU)."""
    model.eval()
    out = [model.encode_image(torch.as_tensor(b[B.PIXEL_VALUES]).to(device))["emb"].float().cpu() for b in batches]
    if not out:
        raise ValueError("the gallery is empty")
    return torch.cat(out)


@torch.no_grad()
def encode_queries(model: nn.Module, batches: Iterable[Mapping[str, Any]],
                   device: str | torch.device = "cpu") -> QueryFeatures:
    """Query batches (``pixel_values``, ``input_ids``, ``attention_mask``) -> :class:`QueryFeatures`."""
    model.eval()
    text, image, tokens = [], [], []
    for b in batches:
        img = model.encode_image(torch.as_tensor(b[B.PIXEL_VALUES]).to(device))
        txt = model.encode_text(torch.as_tensor(b[B.INPUT_IDS]).to(device),
                                torch.as_tensor(b[B.ATTENTION_MASK]).to(device))
        text.append(txt["emb"].float().cpu())
        image.append(img["emb"].float().cpu())
        tok = _token_embeddings(model, img)
        if tok is not None:
            tokens.append(tok.float().cpu())
    if not text:
        raise ValueError("there are no queries")
    return QueryFeatures(torch.cat(text), torch.cat(image), torch.cat(tokens) if tokens else None)


def instance_scores(queries: QueryFeatures, gallery: Tensor, text_weight: float, image_pool: str = "mean",
                    chunk: int = 1024) -> Tensor:
    """``[Q, G]`` scores (see the module docstring), computed ``chunk`` queries at a time."""
    if image_pool not in IMAGE_POOLS:
        raise ValueError(f"image_pool must be one of {IMAGE_POOLS}, got {image_pool!r}")
    if not 0.0 <= text_weight <= 1.0:
        raise ValueError(f"text_weight must be in [0, 1], got {text_weight}")
    if image_pool == "tokens" and queries.tokens is None:
        raise ValueError("image_pool='tokens' needs a model with semantic tokens (a DateModel)")
    rows = []
    for s in range(0, queries.text.shape[0], chunk):
        score = text_weight * (queries.text[s:s + chunk] @ gallery.t())
        if text_weight < 1.0:
            if image_pool == "mean":
                image = queries.image[s:s + chunk] @ gallery.t()
            else:  # [q, K, D] x [G, D] -> [q, K, G] -> best token per gallery item
                image = torch.einsum("qkd,gd->qkg", queries.tokens[s:s + chunk], gallery).amax(dim=1)
            score = score + (1.0 - text_weight) * image
        rows.append(score)
    return torch.cat(rows)


def rank(scores: Tensor, k: int = 100) -> Tensor:
    """``scores [Q, G]`` -> ``[Q, min(k, G)]`` gallery indices, best first."""
    return scores.topk(min(k, scores.shape[1]), dim=1).indices


def random_ranking(n_queries: int, n_gallery: int, k: int = 100, seed: int = 0) -> Tensor:
    """A uniformly random ranking ``[Q, min(k, G)]``: the floor every metric is read against."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n_gallery, generator=g)[:k] for _ in range(n_queries)])


def evaluate(queries: QueryFeatures, gallery: Tensor, query_labels: Sequence[Sequence[str]],
             gallery_labels: Sequence[str], text_weight: float, image_pool: str = "mean") -> dict[str, float]:
    """Product1M's metrics (official and textbook) of one scoring rule."""
    ranked = rank(instance_scores(queries, gallery, text_weight, image_pool))
    return instance_retrieval_metrics(ranked, query_labels, gallery_labels)


def choose_text_weight(queries: QueryFeatures, gallery: Tensor, query_labels: Sequence[Sequence[str]],
                       gallery_labels: Sequence[str], image_pool: str = "mean",
                       weights: Sequence[float] = TEXT_WEIGHTS, metric: str = "inst/textbook/mAP@10"
                       ) -> tuple[float, dict[float, float]]:
    """The ``text_weight`` with the best ``metric`` on a validation split -> (weight, {weight: metric})."""
    scores = {float(w): evaluate(queries, gallery, query_labels, gallery_labels, w, image_pool)[metric]
              for w in weights}
    return max(scores, key=lambda w: (scores[w], -abs(w - 0.5))), scores


def choose_rule(queries: QueryFeatures, gallery: Tensor, query_labels: Sequence[Sequence[str]],
                gallery_labels: Sequence[str], metric: str = "inst/textbook/mAP@10") -> dict[str, Any]:
    """The scoring rule (``image_pool`` among those the model has, and ``text_weight``) with
    the best ``metric`` on a validation split -> ``{"image_pool", "text_weight", "val_metric"}``."""
    best: dict[str, Any] | None = None
    for pool in IMAGE_POOLS:
        if pool == "tokens" and queries.tokens is None:
            continue
        w, table = choose_text_weight(queries, gallery, query_labels, gallery_labels, pool, metric=metric)
        if best is None or table[w] > best["val_metric"]:
            best = {"image_pool": pool, "text_weight": w, "val_metric": table[w]}
    assert best is not None
    return best


def evaluate_checkpoint(model_dir: str, root: str, queries: tuple[str, str] = ("multi", "test"),
                        gallery: tuple[str, str] = ("single", "gallery"), *,
                        val: tuple[str, str] | None = ("multi", "val"), text_weight: float | None = None,
                        image_pool: str | None = None, batch_size: int = 64,
                        device: str = "cpu") -> dict[str, Any]:
    """Instance-level retrieval metrics of a checkpoint folder on an instance-mode dataset.

    ``queries`` / ``gallery`` / ``val``: (domain, split) of ``root``. The scoring rule is
    ``text_weight`` / ``image_pool`` where given, else chosen on ``val`` (:func:`choose_rule`);
    without either, caption and image count equally with pooled embeddings.
    """
    from date_core.inference import load_seeker

    seeker = load_seeker(model_dir, device=device, batch_size=batch_size)
    model, cfg = seeker.model, seeker.model.config

    def feats(domain_split: tuple[str, str], side: str):
        table = read_split(root, *domain_split)
        batches = model_batches(table, seeker.tokenizer, cfg.image_size, cfg.max_text_len, batch_size)
        if side == "gallery":
            return encode_gallery(model, batches, device), labels(table, gallery=True)
        return encode_queries(model, batches, device), labels(table)

    g, glabels = feats(gallery, "gallery")
    rule: dict[str, Any] = {"image_pool": image_pool or "mean", "text_weight": 0.5 if text_weight is None else text_weight}
    if text_weight is None or image_pool is None:
        if val is not None:
            qv, vlabels = feats(val, "queries")
            chosen = choose_rule(qv, g, vlabels, glabels)
            rule = {"image_pool": image_pool or chosen["image_pool"],
                    "text_weight": chosen["text_weight"] if text_weight is None else text_weight,
                    "chosen_on": "/".join(val)}
    q, qlabels = feats(queries, "queries")
    metrics = evaluate(q, g, qlabels, glabels, float(rule["text_weight"]), rule["image_pool"])
    return {**rule, "queries": "/".join(queries), "gallery": "/".join(gallery), **metrics}


# ----------------------------------------------------------------------------- data
def read_split(root: str, domain: str, split: str) -> pa.Table:
    """``ROOT/<domain>/<split>`` as one Arrow table (the contract columns and ``instance_ids``)."""
    import pyarrow.parquet as pq

    from date_core.data import io, storage

    uri = io.pairs_uri(root, domain, split)
    files = io.parquet_files(uri)
    if not files:
        from date_core.data.schema import DataError
        raise DataError(uri, "no Parquet files found")
    fs, _ = storage.resolve_filesystem(uri)
    return pa.concat_tables([pq.read_table(f, filesystem=fs) for f in files], promote_options="default")


def labels(table: pa.Table, gallery: bool = False) -> list:
    """A query table's instance label lists, or a gallery table's labels (the first instance id,
    as Product1M's official script takes it; ``item_id`` where ``instance_ids`` is null)."""
    items = table.column("item_id").to_pylist()
    inst = table.column("instance_ids").to_pylist() if "instance_ids" in table.column_names else [None] * len(items)
    if gallery:
        return [ids[0] if ids else item for ids, item in zip(inst, items)]
    return [list(ids) if ids else [item] for ids, item in zip(inst, items)]


def model_batches(table: pa.Table, tokenizer: Any, image_size: int, max_text_len: int,
                  batch_size: int = 64) -> Iterator[dict[str, np.ndarray]]:
    """Contract rows -> evaluation model batches (no augmentation), through the data layer's
    :class:`~date_core.data.transforms.BatchTransform`, the transform every run uses."""
    from date_core.data.transforms import BatchTransform

    transform = BatchTransform(tokenizer, image_size, max_text_len, train=False)
    for s in range(0, table.num_rows, batch_size):
        part = table.slice(s, batch_size)
        yield transform({name: _objects(part.column(name).to_pylist()) for name in part.column_names
                         if name != "instance_ids"})


def _objects(values: list) -> np.ndarray:
    """A 1-D object array of ``values`` (``np.array`` would make boxes a 2-D array)."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out
