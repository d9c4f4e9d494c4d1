"""Metrics JSON is strict JSON: NaN / inf metrics are written as null (pipelines/evaluate.py)."""
from __future__ import annotations

import io as _io
import json
import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

import date_core
from date_core.data.io import write_table
from date_core.data.schema import PAIR_SCHEMA
from date_core.inference import save_checkpoint
from date_core.evaluation.metrics import PG_NAMES, json_safe, metrics_json
from date_core.text import train_wordpiece



def _strict_loads(text: str):
    """json.loads that rejects NaN / Infinity / -Infinity (as strict parsers do)."""
    def reject(token):
        raise ValueError(f"non-standard JSON constant {token}")
    return json.loads(text, parse_constant=reject)


def _load_evaluate_cli():
    from date_pipelines import evaluate

    return evaluate


def _jpeg(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    out = _io.BytesIO()
    Image.fromarray(arr).save(out, format="JPEG")
    return out.getvalue()


def test_json_safe_replaces_nan_and_inf_everywhere():
    obj = {"a": float("nan"), "b": [np.float32("nan"), np.float64(np.inf), 1.5, -float("inf")],
           "c": {"d": (np.float16(2.0), np.int64(3), np.bool_(True))}, "e": np.array([1.0, np.nan]),
           "f": torch.tensor(float("nan")), "g": "text", "h": None, "i": 7}
    safe = json_safe(obj)
    assert safe == {"a": None, "b": [None, None, 1.5, None], "c": {"d": [2.0, 3, True]}, "e": [1.0, None],
                    "f": None, "g": "text", "h": None, "i": 7}
    assert _strict_loads(metrics_json(obj)) == safe
    with pytest.raises(ValueError):  # the plain dump is what strict parsers reject
        _strict_loads(json.dumps({"x": float("nan")}))


def test_evaluate_cli_writes_null_for_pg_metrics_without_boxes(tmp_path, capsys):
    queries = ["a red mug", "blue chair", "a pack of coffee", "green tea"]
    tok = train_wordpiece(queries, vocab_size=120)
    torch.manual_seed(0)
    model = date_core.build_model("tiny", vocab_size=len(tok), max_text_len=8)
    ckpt = save_checkpoint(model, tmp_path / "ckpt", tok)
    n = len(queries)
    table = pa.Table.from_pydict({
        "pair_id": [f"p{i}" for i in range(n)], "image_id": [f"i{i}" for i in range(n)],
        "image": [_jpeg(i) for i in range(n)], "width": [56] * n, "height": [40] * n,
        "query": queries, "box": [None] * n, "alt_boxes": [None] * n,  # no grounding labels at all
        "domain": ["live"] * n, "split": ["test"] * n, "item_id": [f"it{i}" for i in range(n)],
    }, schema=PAIR_SCHEMA)
    data = tmp_path / "data"
    write_table(table, str(data), "live", "test")
    out = tmp_path / "out" / "metrics.json"

    rc = _load_evaluate_cli().main(["--model", str(ckpt), "--data", str(data), "--domain", "live",
                                    "--split", "test", "--out", str(out), "--batch-size", "3"])
    assert rc == 0, capsys.readouterr()
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    metrics = _strict_loads(text)  # raises on NaN before the fix
    for name in PG_NAMES:
        assert metrics[f"live_test/{name}"] is None, name
    assert metrics["live_test/pg/n_boxes"] == 0.0
    # The retrieval metrics are defined (every query has its own image) and stay numbers.
    assert isinstance(metrics["live_test/pr/R@1"], float) and math.isfinite(metrics["live_test/pr/R@1"])
    assert metrics["domain"] == "live" and metrics["split"] == "test"
