"""A small prepared ProductWorld dataset written with the library alone (no Ray, seconds), for
tests, benchmarks and quick experiments."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from ..text import train_wordpiece
from . import io
from .productworld import render_images
from .schema import PAIR_SCHEMA
from .splits import DEFAULT_FRACTIONS, assign_split


def write_small_productworld(root: str | Path, mall: int, live: int, seed: int = 0, vocab_size: int = 2000) -> Path:
    """``mall`` + ``live`` ProductWorld images -> ``root/<domain>/<split>/*.parquet`` (splits by
    a hash of image_id) and ``root/tokenizer/`` (WordPiece on the train queries)."""
    root = Path(root)
    queries = []
    for domain, n in (("mall", mall), ("live", live)):
        rows = render_images(domain, range(n), seed)
        for row in rows:
            row["split"] = assign_split(row["image_id"], DEFAULT_FRACTIONS)
        queries += [r["query"] for r in rows if r["split"] == "train"]
        for split in ("train", "val", "test"):
            table = pa.Table.from_pylist([r for r in rows if r["split"] == split], schema=PAIR_SCHEMA)
            io.write_table(table, str(root), domain, split)
    train_wordpiece(queries, vocab_size=vocab_size).save_pretrained(str(root / "tokenizer"))
    return root
