"""The batch contract between the data layer and the model.

Every training, evaluation and labelling batch is a ``dict[str, Tensor]`` (or the
same keys as numpy arrays on the Ray Data side) with the keys below. The data layer's
``date_core.data.transforms.BatchTransform`` produces them from Parquet rows; the model,
the losses, the engine and the adaptation code consume them. Strings never travel in a
batch (``iter_torch_batches`` cannot carry them): ids become stable 63-bit hashes.

Shapes: batch B, image side S (square, letterboxed), text length L, alternative boxes M.
"""
from __future__ import annotations

import hashlib

import numpy as np

#: float32 [B, 3, S, S], letterboxed image normalised with ``IMAGE_MEAN``/``IMAGE_STD``.
PIXEL_VALUES = "pixel_values"
#: int64 [B, L] token ids, padded to the model's ``max_text_len``.
INPUT_IDS = "input_ids"
#: int64 [B, L], 1 for real tokens, 0 for padding.
ATTENTION_MASK = "attention_mask"
#: float32 [B, 4] target box as (cx, cy, w, h) in [0, 1] of the letterboxed square; zeros when absent.
BOXES = "boxes"
#: float32 [B], 1.0 where ``BOXES`` holds a real (or pseudo) target, else 0.0.
HAS_BOX = "has_box"
#: float32 [B], per-pair weight of the box losses (1.0 for annotations, reliability for pseudo boxes).
BOX_WEIGHT = "box_weight"
#: float32 [B, M, 4] alternative boxes, same format as ``BOXES``; padded with zeros.
ALT_BOXES = "alt_boxes"
#: float32 [B, M], 1.0 where ``ALT_BOXES`` holds a real box.
ALT_MASK = "alt_mask"
#: int64 [B] stable hash of ``item_id`` (retrieval relevance, false-negative masking).
ITEM_KEY = "item_key"
#: int64 [B] stable hash of ``image_id`` (deduplicates the gallery: an image may carry several queries).
IMAGE_KEY = "image_key"
#: int64 [B] stable hash of ``pair_id``.
PAIR_KEY = "pair_key"
#: float32 [B, 2] original (width, height) in pixels, to map boxes back to the original frame.
ORIG_SIZE = "orig_size"

#: Number of alternative-box slots in a batch; extra alternatives are dropped from the batch
#: (never from the dataset), which can only make evaluation stricter.
MAX_ALT_BOXES = 16

IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


def stable_key(text: str) -> int:
    """A 63-bit non-negative integer hash of ``text``, equal on every process and machine."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def stable_keys(texts) -> np.ndarray:
    """Vectorised :func:`stable_key` over an iterable of strings -> int64 [N]."""
    return np.fromiter((stable_key(str(t)) for t in texts), dtype=np.int64)
