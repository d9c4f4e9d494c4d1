"""The batch transform that joins data to model: contract rows -> the keys of :mod:`date_core.batch`.

:class:`BatchTransform` is a picklable callable. It works in plain Python on
``io.to_numpy_batch(table)`` and as a Ray Data UDF::

    ds.map_batches(BatchTransform, fn_constructor_args=(tok_path, 224, 32),
                   batch_format="numpy", concurrency=4)

It is the data path's hot loop, so JPEGs are decoded with PIL's draft mode (the decoder
scales by 1/2, 1/4 or 1/8 in the DCT, never below the letterbox size) and resized with the
exact source region draft reports, so the canvas matches :func:`date_core.imaging.letterbox_image`
geometry while boxes map through :class:`~date_core.imaging.Letterbox` built from the
*original* width and height.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import os
import secrets
import sys
from typing import Any, Mapping

import numpy as np
from PIL import Image

from .. import batch as B
from ..imaging import PAD_VALUE, Letterbox, xyxy_pixels_to_letterbox_cxcywh
from ..text import load_tokenizer, tokenize


def _box_or_none(value: Any) -> np.ndarray | None:
    """One stored box (list / array / None) -> float64 [4] or None."""
    if value is None:
        return None
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size != 4 or np.isnan(arr).all():
        return None
    return arr


def _boxes(value: Any) -> np.ndarray:
    """Stored alternative boxes (list of boxes / 2-D array / None) -> float64 [M, 4]."""
    if value is None:
        return np.zeros((0, 4))
    rows = [b for b in (_box_or_none(v) for v in value) if b is not None]
    return np.stack(rows) if rows else np.zeros((0, 4))


def decode_letterbox(data: bytes, size: int, canvas: np.ndarray, flip: bool = False,
                     draft: bool = True) -> Letterbox:
    """Decode ``data`` into the uint8 ``[size, size, 3]`` ``canvas`` (already filled with the pad
    value) keeping the aspect ratio; ``flip`` mirrors the image horizontally. Returns the
    geometry of the *original* frame (what box mapping needs)."""
    img = Image.open(io.BytesIO(data))
    width, height = img.size
    lb = Letterbox(float(width), float(height), int(size))
    new_w, new_h = max(1, round(width * lb.scale)), max(1, round(height * lb.scale))
    region = None
    if draft and img.format == "JPEG":
        # draft() returns (mode, region of the original in the scaled image's coordinates).
        res = img.draft("RGB", (new_w, new_h))
        if res is not None:
            region = res[1]
    if img.mode != "RGB":
        img = img.convert("RGB")
    resized = img.resize((new_w, new_h), Image.BILINEAR, box=region)
    if flip:
        resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    ox, oy = (size - new_w) // 2, (size - new_h) // 2
    canvas[oy:oy + new_h, ox:ox + new_w] = np.asarray(resized, dtype=np.uint8)
    return lb


def _normalise_lut() -> np.ndarray:
    """float32 [3, 256]: channel c of uint8 value v -> (v / 255 - mean_c) / std_c, computed with
    the same float32 operations as :func:`date_core.imaging.to_pixel_values` (bit-identical)."""
    v = np.arange(256, dtype=np.float32)[:, None] / np.float32(255.0)
    mean = np.asarray(B.IMAGE_MEAN, dtype=np.float32)
    std = np.asarray(B.IMAGE_STD, dtype=np.float32)
    return np.ascontiguousarray(((v - mean) / std).T)


_LUT = _normalise_lut()

# Augmentation randomness. A generator built in the constructor would be pickled into every
# Ray task / actor, so every task, and every epoch (which re-runs the same tasks), would start
# from the same state and repeat the same "random" flips and jitter. Instead each call draws a
# fresh generator from SeedSequence([seed, hash of the batch's pair ids, call number, ...]):
# - the pair-id hash makes batches differ from each other even in fresh processes;
# - _CALLS, a process-wide counter shared by all instances, makes repeated calls in one process
#   (the next epoch on a reused Ray worker, two unpickled copies of one transform) differ;
# - away from the process that built the instance (an unpickled copy in a Ray task, a forked
#   or spawned loader worker) or inside any Ray worker (an actor built there through
#   fn_constructor_args), the process id and _PROCESS_NONCE (random, drawn once per process)
#   are mixed in too: a fresh worker restarts _CALLS at 0 and would otherwise repeat the
#   previous epoch's augmentations of the same batch. That part is not reproducible across
#   runs, which Ray's scheduling (block boundaries, which worker runs what) never is anyway.
# So an instance called where it was built, outside Ray (plain Python: tests, notebooks), is
# reproducible for a given seed and sequence of calls, and nothing repeats across Ray tasks,
# actors or epochs.
_CALLS = itertools.count()
_PROCESS_NONCE = secrets.randbits(64)
_U64 = (1 << 64) - 1


def _ids_hash(ids: Any) -> int:
    """A stable (process- and run-independent) 64-bit hash of a column of ids."""
    h = hashlib.blake2b(digest_size=8)
    for v in np.asarray(ids, dtype=object).reshape(-1):
        h.update(str(v).encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return int.from_bytes(h.digest(), "little")


def _in_ray_worker() -> bool:
    """True inside a Ray task or actor (never imports Ray: a Ray worker already has)."""
    ray = sys.modules.get("ray")
    if ray is None:
        return False
    try:
        # The worker's mode, as get_task_id() checks it (which logs a warning on the driver).
        return bool(ray.is_initialized()) and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:  # unsure: prefer never repeating over reproducibility
        return True


def pixel_values_from_canvases(canvases: np.ndarray) -> np.ndarray:
    """uint8 [B, S, S, 3] -> float32 [B, 3, S, S], equal to ``imaging.to_pixel_values`` but one
    table lookup per value instead of four array passes (about 2x faster on a batch)."""
    n, h, w, _ = canvases.shape
    out = np.empty((n, 3, h, w), dtype=np.float32)
    for c in range(3):
        np.take(_LUT[c], canvases[..., c], out=out[:, c])
    return out


class BatchTransform:
    """Contract rows (dict of numpy arrays) -> model batch (dict of numpy arrays, see
    :mod:`date_core.batch`): ``pixel_values`` float32 [B, 3, S, S], ``input_ids`` /
    ``attention_mask`` int64 [B, L], ``boxes`` float32 [B, 4] (cx, cy, w, h of the letterboxed
    square, zeros when null), ``has_box`` / ``box_weight`` float32 [B], ``alt_boxes`` float32
    [B, M, 4] and ``alt_mask`` float32 [B, M] (M = ``MAX_ALT_BOXES``), ``item_key`` /
    ``image_key`` / ``pair_key`` int64 [B], ``orig_size`` float32 [B, 2] (width, height).

    Args:
        tokenizer_path_or_obj: a tokenizer, or a folder saved with ``save_pretrained`` (local
            or ``s3://``, loaded lazily on first call so that the object pickles small).
        image_size: S, the side of the square model input.
        max_text_len: L.
        train: apply training augmentation: horizontal flip (boxes mirrored with it) with
            probability ``hflip_prob`` and brightness/contrast jitter of ``jitter``.
        seed: base seed of the augmentation (None: fresh OS entropy on every call). Each call
            derives its own generator from the seed, the batch's ``pair_id`` values and a
            per-process call counter (plus the process id and a per-process nonce in Ray
            workers and other processes), so that Ray tasks and epochs never repeat each
            other's augmentations; see the note above ``_CALLS``.
        draft: use JPEG draft decoding (off only to measure what it buys).
        own_counter: count this instance's calls on its own instead of the process-wide counter:
            an in-process run (the benchmark) is then reproducible whatever ran before it in the
            process. Not for Ray, where copies of one instance must not repeat each other.
    """

    def __init__(self, tokenizer_path_or_obj: Any, image_size: int, max_text_len: int, train: bool = False,
                 *, hflip_prob: float = 0.5, jitter: float = 0.2, seed: int | None = None, draft: bool = True,
                 own_counter: bool = False):
        if isinstance(tokenizer_path_or_obj, (str, os.PathLike)):
            self._tok_path, self._tok = str(tokenizer_path_or_obj), None
        else:
            self._tok_path, self._tok = None, tokenizer_path_or_obj
        self.image_size, self.max_text_len, self.train = int(image_size), int(max_text_len), bool(train)
        self.hflip_prob, self.jitter, self.draft = float(hflip_prob), float(jitter), bool(draft)
        self._seed = None if seed is None else int(seed)
        self._home_pid = os.getpid()  # the process that built it (pickled along with it)
        self._calls = 0 if own_counter else None

    @property
    def tokenizer(self):
        if self._tok is None:
            self._tok = load_tokenizer(self._tok_path)
        return self._tok

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self._tok_path is not None:
            state["_tok"] = None  # reloaded where it runs
        return state

    def _batch_rng(self, batch: Mapping[str, np.ndarray]) -> np.random.Generator:
        """This call's augmentation generator (see the note above ``_CALLS``)."""
        if self._seed is None:
            return np.random.default_rng()
        ids = batch["pair_id"] if "pair_id" in batch else batch.get("image_id", ())
        if self._calls is None:
            call = next(_CALLS)
        else:
            call, self._calls = self._calls, self._calls + 1
        key = [self._seed & _U64, _ids_hash(ids), call]
        pid = os.getpid()
        if pid != self._home_pid or _in_ray_worker():
            key += [pid, _PROCESS_NONCE]
        return np.random.default_rng(np.random.SeedSequence(key))

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch["image"]
        n, size, m = len(images), self.image_size, B.MAX_ALT_BOXES
        canvases = np.full((n, size, size, 3), PAD_VALUE, dtype=np.uint8)
        boxes = np.zeros((n, 4), np.float32)
        has_box = np.zeros(n, np.float32)
        alt = np.zeros((n, m, 4), np.float32)
        alt_mask = np.zeros((n, m), np.float32)
        orig = np.zeros((n, 2), np.float32)
        rng = self._batch_rng(batch) if self.train else None
        flips = (rng.random(n) < self.hflip_prob) if self.train else np.zeros(n, bool)
        box_col = batch.get("box")
        alt_col = batch.get("alt_boxes")
        for i in range(n):
            lb = decode_letterbox(bytes(images[i]), size, canvases[i], bool(flips[i]), self.draft)
            orig[i] = (lb.width, lb.height)
            box = _box_or_none(box_col[i]) if box_col is not None else None
            alts = _boxes(alt_col[i])[:m] if alt_col is not None else np.zeros((0, 4))
            if flips[i]:
                box = None if box is None else _hflip(box, lb.width)
                alts = _hflip(alts, lb.width)
            if box is not None:
                boxes[i] = xyxy_pixels_to_letterbox_cxcywh(box, lb)
                has_box[i] = 1.0
            if len(alts):
                alt[i, :len(alts)] = xyxy_pixels_to_letterbox_cxcywh(alts, lb)
                alt_mask[i, :len(alts)] = 1.0
        pixels = pixel_values_from_canvases(canvases)
        if self.train and self.jitter > 0:
            # Brightness/contrast jitter on the normalised image: box-safe, and cheap here.
            gain = 1.0 + rng.uniform(-self.jitter, self.jitter, (n, 1, 1, 1)).astype(np.float32)
            bias = rng.uniform(-self.jitter, self.jitter, (n, 1, 1, 1)).astype(np.float32)
            pixels = np.clip(pixels * gain + bias, -1.0, 1.0)
        ids, mask = tokenize(self.tokenizer, [str(q) for q in batch["query"]], self.max_text_len)
        weight = np.ones(n, np.float32)
        if "box_weight" in batch:
            w = np.asarray([1.0 if v is None else float(v) for v in batch["box_weight"]], np.float32)
            weight = np.where(np.isnan(w), 1.0, w).astype(np.float32)
        return {
            B.PIXEL_VALUES: pixels,
            B.INPUT_IDS: ids,
            B.ATTENTION_MASK: mask,
            B.BOXES: boxes,
            B.HAS_BOX: has_box,
            B.BOX_WEIGHT: weight,
            B.ALT_BOXES: alt,
            B.ALT_MASK: alt_mask,
            B.ITEM_KEY: B.stable_keys(batch["item_id"]),
            B.IMAGE_KEY: B.stable_keys(batch["image_id"]),
            B.PAIR_KEY: B.stable_keys(batch["pair_id"]),
            B.ORIG_SIZE: orig,
        }


def _hflip(boxes: np.ndarray, width: float) -> np.ndarray:
    """Mirror x1 y1 x2 y2 boxes ``[..., 4]`` in a frame of ``width`` pixels."""
    out = np.array(boxes, dtype=np.float64, copy=True)
    out[..., 0], out[..., 2] = width - boxes[..., 2], width - boxes[..., 0]
    return out
