"""The output side of a prepare run, apart from the rows themselves: guarding an existing
dataset, rows rejected before ingest, and the query tokenizer saved with the dataset."""
from __future__ import annotations

import tempfile
from typing import Any, Iterable

import pyarrow.fs as pafs

from . import io, storage
from .schema import REJECTED_DIR, SUMMARY_FILE, TOKENIZER_DIR, DataError
from .summary import RunSummary


def _existing(out: str) -> tuple[list[tuple[str, str]], list[str]]:
    old = io.list_datasets(out)
    leftovers = [p for p in (SUMMARY_FILE, REJECTED_DIR, TOKENIZER_DIR) if storage.exists(storage.join(out, p))]
    return old, leftovers


def check_output(out: str, overwrite: bool = False) -> None:
    """Raise :class:`DataError` when ``out`` holds a prepared dataset and ``overwrite`` is off
    (checked before a long run starts; nothing is deleted here)."""
    old, leftovers = _existing(out)
    if (old or leftovers) and not overwrite:
        raise DataError(out, "already holds a prepared dataset; pass --overwrite to replace it")


def prepare_output(out: str, overwrite: bool = False) -> None:
    """Refuse to mix a new run into an existing dataset at ``out``; with ``overwrite``, delete
    what an earlier run wrote there (its domain/split folders, rejected/, tokenizer/, summary)
    and nothing else."""
    check_output(out, overwrite)
    old, leftovers = _existing(out)
    if not old and not leftovers:
        storage.makedirs(out)
        return
    fs, base = storage.resolve_filesystem(out)
    for domain in sorted({d for d, _ in old}):
        fs.delete_dir(f"{base}/{domain}")
    for name in leftovers:
        path = f"{base}/{name}"
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            fs.delete_dir(path)
        else:
            fs.delete_file(path)


def write_parse_rejects(out: str, rejected, summary: RunSummary) -> None:
    """Write rows rejected while parsing (before any image was read) to ``OUT/rejected/``."""
    if rejected.num_rows:
        io.write_parquet_file(rejected, storage.join(out, REJECTED_DIR), prefix="parse")
        summary.add_rejected(rejected)


def save_tokenizer(out: str, *, pretrained: str | None = None, domains: Iterable[str] = (),
                   vocab_size: int = 8000) -> dict[str, Any]:
    """Save the dataset's query tokenizer at ``OUT/tokenizer/`` and describe it.

    With ``pretrained`` (a local folder) that tokenizer is copied; otherwise a WordPiece
    tokenizer is trained on the *train* queries of ``domains`` (read back from what was
    written, so it sees exactly the kept rows). S3 outputs are saved locally, then uploaded.
    """
    from ..text import load_tokenizer, train_wordpiece  # transformers: only when a run gets here

    if pretrained:
        tok = load_tokenizer(pretrained)
        info: dict[str, Any] = {"source": "pretrained", "path": str(pretrained)}
    else:
        queries: list[str] = []
        for domain in domains:
            if storage.exists(io.pairs_uri(out, domain, "train")):
                queries += io.read_table(out, domain, "train", columns=["query"]).column("query").to_pylist()
        if not queries:
            raise DataError(out, "no train queries to train a tokenizer on (pass --tokenizer PATH)")
        tok = train_wordpiece(queries, vocab_size=vocab_size)
        info = {"source": "wordpiece", "train_queries": len(queries), "vocab_size": len(tok)}
    target = storage.join(out, TOKENIZER_DIR)
    if storage.is_s3(out):
        with tempfile.TemporaryDirectory(prefix="date-tok-") as tmp:
            tok.save_pretrained(tmp)
            storage.upload_dir(tmp, target)
    else:
        tok.save_pretrained(storage.resolve_filesystem(target)[1])
    return {**info, "path": TOKENIZER_DIR} if not pretrained else {**info, "saved": TOKENIZER_DIR}
