"""Query tokenizer: a WordPiece tokenizer trained on the corpus's queries, or any local
pretrained Hugging Face tokenizer folder.

Chinese (and other CJK) text tokenizes per character: the BERT normaliser puts spaces around
CJK ideographs before WordPiece sees them, as BERT's own Chinese models do.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(queries: Iterable[str], vocab_size: int = 8000, min_frequency: int = 1) -> PreTrainedTokenizerFast:
    """Train a lower-casing WordPiece tokenizer (BERT-style, CJK per character) on ``queries``."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        show_progress=False,  # without a terminal its progress bars leave one blank line per phase
    )
    tok.train_from_iterator((str(q) for q in queries), trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer saved with ``save_pretrained`` from a local folder or an ``s3://``
    folder (never a hub name). An S3 folder is copied to a temporary folder that is removed
    once loaded: every Ray worker of every round loads it, and copies must not pile up."""
    if str(path).startswith("s3://"):
        from date_core.data import storage

        with storage.local_dir(path) as local:
            return load_tokenizer(local)
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {path}")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def tokenize(tokenizer: PreTrainedTokenizerBase, queries: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Queries -> (int64 ``[B, max_len]`` ids, int64 ``[B, max_len]`` attention mask)."""
    enc = tokenizer(
        [str(q) for q in queries], padding="max_length", truncation=True, max_length=max_len,
        return_tensors="np", return_token_type_ids=False,
    )
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
