"""Checkpoints and the user-facing seeker.

A checkpoint is a folder (``save_pretrained`` style)::

    config.json          {"format": "date-seeker", "format_version": 1, "model": {...ModelConfig}}
    model.safetensors    the weights
    tokenizer/           the query tokenizer (``save_pretrained``)

``load_seeker(folder)`` gives a :class:`Seeker` that works on raw strings and PIL images:
``encode_queries``, ``encode_images``, ``search``, ``ground`` (boxes in original pixels).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .imaging import letterbox_cxcywh_to_xyxy_pixels, preprocess_pil
from .model import DateModel, ModelConfig, unwrap
from .model.seekers import rerank_by_grounding
from date_core.retrieval.search import exact_search
from .text import load_tokenizer, tokenize

FORMAT = "date-seeker"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"


def _portable_config(model: DateModel) -> dict:
    """The model config with pretrained encoders replaced by their architecture, so a checkpoint
    rebuilds without the original pretrained folder (its weights are in the checkpoint)."""
    cfg = copy.deepcopy(model.config.to_dict())
    for side, enc in (("vision", model.vision), ("text", model.text)):
        if cfg[f"{side}_pretrained"]:
            cfg[f"{side}_hf_config"] = enc.backbone.config.to_dict()
            cfg[f"{side}_pretrained"] = None
    # the checkpoint's weights replace the packaged ImageNet ones: rebuilding needs no weights package
    cfg["vision_backbone_weights"] = False
    return cfg


def save_checkpoint(model: nn.Module, folder: str | Path, tokenizer=None, extra: dict | None = None) -> Path:
    """Write ``config.json``, ``model.safetensors`` and (when given) ``tokenizer/`` into ``folder``.

    ``extra`` (JSON-serialisable) is stored under ``"extra"`` in ``config.json`` (e.g. the
    training step or the metrics at save time).
    """
    model = unwrap(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": FORMAT})
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "date_core_version": __version__,
            "model": _portable_config(model), "extra": extra or {}}
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder / TOKENIZER_DIR))
    return folder


def read_checkpoint_config(folder: str | Path) -> dict:
    """``config.json`` of a checkpoint folder, checked to be a DATE seeker checkpoint."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"not a DATE checkpoint folder (no {CONFIG_FILE}): {folder}")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} checkpoint (format={meta.get('format')!r})")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {meta['format_version']}, newer than this library's "
                         f"{FORMAT_VERSION}; upgrade date_core")
    return meta


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> DateModel:
    """Rebuild the model from a checkpoint folder and load its weights (strictly), in eval mode."""
    meta = read_checkpoint_config(folder)
    model = DateModel(ModelConfig.from_dict(meta["model"]))
    state = load_file(str(Path(folder) / WEIGHTS_FILE))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def load_weights_into(model: nn.Module, folder: str | Path) -> nn.Module:
    """Copy the weights of the checkpoint ``folder`` into ``model`` (built from the run's own
    config), e.g. pretrained weights that start a training run (``model.init_from``).

    Every parameter and buffer must match by name and shape: a missing folder raises
    ``FileNotFoundError``, any other architecture (preset, width, vocabulary) a ``ValueError``
    naming the first differences. Returns ``model``.
    """
    read_checkpoint_config(folder)
    weights = Path(folder) / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint {folder} has no {WEIGHTS_FILE}")
    state = load_file(str(weights))
    target = unwrap(model).state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    shapes = sorted(k for k in set(target) & set(state) if tuple(target[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                parts.append(f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (e.g. " + ", ".join(
                f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}" for k in shapes[:3]) + ")")
        raise ValueError(f"checkpoint {folder} does not fit the configured model (model.preset + overrides): "
                         + "; ".join(parts))
    unwrap(model).load_state_dict(state, strict=True)
    return model


@dataclass
class Grounding:
    """Boxes ``[B, 4]`` (x1, y1, x2, y2 in each ORIGINAL image's pixels) and confidence ``[B]``
    (the predicted IoU of the box, in [0, 1])."""

    boxes: np.ndarray
    confidence: np.ndarray


class Seeker:
    """Product retrieval and grounding on raw strings and PIL images.

    Embeddings come back as float32 numpy ``[N, D]``, L2-normalised.
    """

    def __init__(self, model: DateModel, tokenizer, device: str | torch.device = "cpu", batch_size: int = 64) -> None:
        self.model = unwrap(model).to(device).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.image_size = int(self.model.config.image_size)
        self.max_text_len = int(self.model.config.max_text_len)

    # -- inputs
    def _text(self, queries: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(queries, str):
            raise TypeError("queries must be a list of strings, not one string")
        if any(not str(q).strip() for q in queries):
            raise ValueError("empty query")
        ids, mask = tokenize(self.tokenizer, list(queries), self.max_text_len)
        return torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device)

    def _pixels(self, images: Sequence[Image.Image]):
        if any(not isinstance(im, Image.Image) for im in images):
            raise TypeError("images must be PIL.Image.Image objects")
        pixels, boxes = preprocess_pil(list(images), self.image_size)
        return torch.from_numpy(pixels).to(self.device), boxes

    # -- public API
    @torch.no_grad()
    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        """Queries -> float32 ``[Q, D]`` L2-normalised embeddings."""
        out = []
        for i in range(0, len(queries), self.batch_size):
            ids, mask = self._text(queries[i:i + self.batch_size])
            out.append(self.model.encode_text(ids, mask)["emb"].float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.model.config.embed_dim), np.float32)

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """PIL images (any size; letterboxed) -> float32 ``[G, D]`` L2-normalised embeddings."""
        out = []
        for i in range(0, len(images), self.batch_size):
            pixels, _ = self._pixels(images[i:i + self.batch_size])
            out.append(self.model.encode_image(pixels)["emb"].float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.model.config.embed_dim), np.float32)

    def search(self, query_embeddings, gallery_embeddings, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k gallery rows per query (:func:`date_core.retrieval.search.exact_search`) ->
        (float32 ``[Q, k]`` cosine scores, int64 ``[Q, k]`` indices)."""
        return exact_search(np.asarray(query_embeddings, np.float32), np.asarray(gallery_embeddings, np.float32), k,
                            device=self.device)

    @torch.no_grad()
    def ground(self, images: Sequence[Image.Image], queries: Sequence[str]) -> Grounding:
        """Find query i's product in image i -> :class:`Grounding` in original pixels."""
        if len(images) != len(queries):
            raise ValueError(f"ground() pairs image i with query i: {len(images)} images, {len(queries)} queries")
        boxes, confs = [], []
        for i in range(0, len(images), self.batch_size):
            pixels, geoms = self._pixels(images[i:i + self.batch_size])
            ids, mask = self._text(queries[i:i + self.batch_size])
            out = self.model(pixels, ids, mask)
            pred = out["pred_boxes"].float().cpu().numpy()
            boxes += [letterbox_cxcywh_to_xyxy_pixels(p, g) for p, g in zip(pred, geoms)]
            confs.append(out["pred_conf"].float().cpu().numpy())
        if not boxes:
            return Grounding(np.zeros((0, 4), np.float32), np.zeros(0, np.float32))
        return Grounding(np.stack(boxes).astype(np.float32), np.concatenate(confs).astype(np.float32))

    @torch.no_grad()
    def search_images(self, queries: Sequence[str], images: Sequence[Image.Image], k: int = 10,
                      rerank_weight: float | None = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Encode, search and (with ``rerank_weight``) re-rank each query's top-k by grounding
        confidence: score = cosine + weight * confidence. Returns (``[Q, k]`` scores, indices)."""
        scores, idx = self.search(self.encode_queries(queries), self.encode_images(images), k)
        scores, idx = torch.from_numpy(scores), torch.from_numpy(idx)
        if not rerank_weight:
            return scores.numpy(), idx.numpy()
        k = idx.shape[1]
        per_chunk = max(1, self.batch_size // k)  # queries whose k candidates fit one image batch
        out_s, out_i = [], []
        for start in range(0, len(queries), per_chunk):
            sl = slice(start, start + per_chunk)
            ids, mask = self._text(list(queries[sl]))
            text_enc = self.model.encode_text(ids, mask)
            pixels, _ = self._pixels([images[j] for j in idx[sl].flatten().tolist()])
            new_scores, order, _ = rerank_by_grounding(self.model, text_enc, self.model.encode_image(pixels),
                                                       scores[sl].to(self.device), rerank_weight)
            out_s.append(new_scores.cpu())
            out_i.append(idx[sl].gather(1, order.cpu()))
        return torch.cat(out_s).numpy(), torch.cat(out_i).numpy()


def load_seeker(path: str | Path, device: str | torch.device = "cpu", batch_size: int = 64) -> Seeker:
    """A :class:`Seeker` from a local checkpoint folder written by :func:`save_checkpoint`."""
    folder = Path(path)
    tok_dir = folder / TOKENIZER_DIR
    if not tok_dir.is_dir():
        raise FileNotFoundError(f"checkpoint {folder} has no {TOKENIZER_DIR}/ folder: save it with "
                                "save_checkpoint(model, folder, tokenizer)")
    return Seeker(load_model(folder, device), load_tokenizer(tok_dir), device=device, batch_size=batch_size)
