"""Real photos for the adaptation benchmark: Freiburg groceries (source) -> "Freiburg live" (target).

As Cityscapes -> Foggy Cityscapes in adaptive detection, the target domain is a disjoint set of
the same photos turned into live-stream frames: each photo is shrunk into a 16:9 frame on a
room-coloured background (products get smaller and off-centre), its detail is lost by a
downscale-upscale and a blur, it gets a colour cast and a brightness change, a stream overlay
(a banner across the bottom and a badge in a corner, both partly over the picture) and heavy
JPEG compression. The boxes follow the geometry exactly; the target's boxes are hidden from
training (used only for evaluation and pseudo-label precision). The knobs were calibrated once
so that the source-only model sits well below the oracle (docs/experiments.md), then frozen here.

Split (deterministic, by a hash of the image id): 55% source train, 25% target train, 20%
target test (about 990 test pairs: one query per photo).
"""
from __future__ import annotations

import hashlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "freiburg_groceries_voc"
WORK = ROOT / "bench" / "_work" / "groceries"
DOMAIN = "grocery"
#: the frozen shift (see the module doc)
LIVE = dict(frame=(320, 180), scale=(0.55, 0.8), detail=(0.3, 0.5), blur=(0.6, 1.4), cast=0.25,
            brightness=(0.7, 1.1), banner=(0.16, 0.24), jpeg=(20, 40))


def prepare(voc: Path = SHARED, out: Path = WORK) -> Path:
    """``prepare voc`` once into ``bench/_work/groceries``; later runs reuse it."""
    if not (out / "_summary.json").is_file():
        cmd = [sys.executable, str(ROOT / "pipelines" / "prepare.py"), "voc", str(voc), "--domain", DOMAIN,
               "--out", str(out), "--overwrite", "--num-cpus", "2"]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return out


def _bucket(image_id: str, salt: str = "") -> float:
    """The image's place in [0, 1): a hash of its id (``salt`` empty: the split of every table
    before the frozen protocol; bench/protocol.yaml names the report split's salt)."""
    return int.from_bytes(hashlib.blake2b((salt + image_id).encode(), digest_size=4).digest(), "little") / 2 ** 32


def to_live(image_bytes: bytes, box: list[float], alt: list[list[float]] | None, rng: np.random.Generator
            ) -> tuple[bytes, int, int, list[float], list[list[float]]]:
    """One photo -> a live-stream frame (JPEG bytes, width, height, box, alt boxes in its pixels)."""
    img = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    fw, fh = LIVE["frame"]
    s = rng.uniform(*LIVE["scale"]) * fh / img.height
    w, h = max(8, int(img.width * s)), max(8, int(img.height * s))
    x0, y0 = int(rng.integers(0, fw - w + 1)), int(rng.integers(0, fh - h + 1))
    frame = Image.new("RGB", (fw, fh), tuple(int(v) for v in rng.integers(60, 140, 3)))
    small = img.resize((w, h), Image.BILINEAR)
    d = rng.uniform(*LIVE["detail"])  # lose detail: down to a fraction, back up
    small = small.resize((max(4, int(w * d)), max(4, int(h * d))), Image.BILINEAR).resize((w, h), Image.BILINEAR)
    frame.paste(small, (x0, y0))
    frame = frame.filter(ImageFilter.GaussianBlur(rng.uniform(*LIVE["blur"])))
    arr = np.asarray(frame, dtype=np.float32)
    arr = arr * (1 + rng.uniform(-LIVE["cast"], LIVE["cast"], 3)) * rng.uniform(*LIVE["brightness"])
    frame = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(frame, "RGBA")
    bh = int(fh * rng.uniform(*LIVE["banner"]))
    draw.rectangle([0, fh - bh, fw, fh], fill=tuple(int(v) for v in rng.integers(0, 255, 3)) + (200,))
    for k in range(int(rng.integers(2, 5))):  # "text" in the banner
        tx = int(rng.integers(4, fw - 60))
        draw.rectangle([tx, fh - bh + 4 + 6 * k % max(1, bh - 8), tx + int(rng.integers(20, 60)), fh - bh + 9 + 6 * k % max(1, bh - 8)],
                       fill=(255, 255, 255, 220))
    draw.rectangle([fw - 50, 6, fw - 8, 22], fill=(220, 30, 30, 230))  # "LIVE" badge
    buf = io.BytesIO()
    frame.save(buf, "JPEG", quality=int(rng.integers(*LIVE["jpeg"])))

    def move(b: list[float]) -> list[float]:
        return [x0 + b[0] * s, y0 + b[1] * s, x0 + b[2] * s, y0 + b[3] * s]

    return buf.getvalue(), fw, fh, move(box), [move(a) for a in (alt or [])]


def load_tables(seed: int = 0, salt: str = "") -> dict[str, pa.Table]:
    """``source_train``, ``target_train``, ``target_test`` contract tables (target rows degraded
    with generator ``seed``; the split by a hash of the image id with ``salt``)."""
    from date_core.data.io import read_table

    root = prepare()
    rows = [r for split in ("train", "val", "test") for r in read_table(str(root), DOMAIN, split).to_pylist()]
    rng = np.random.default_rng(seed)
    parts: dict[str, list[dict]] = {"source_train": [], "target_train": [], "target_test": []}
    for row in rows:
        u = _bucket(str(row["image_id"]), salt)
        part = "source_train" if u < 0.55 else "target_train" if u < 0.8 else "target_test"
        if part != "source_train":
            image, w, h, box, alt = to_live(row["image"], row["box"], row.get("alt_boxes"), rng)
            row = {**row, "image": image, "width": w, "height": h, "box": box, "alt_boxes": alt, "domain": "live"}
        parts[part].append(row)
    return {k: pa.Table.from_pylist(v) for k, v in parts.items()}
