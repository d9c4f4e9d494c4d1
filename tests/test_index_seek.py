"""Index, search and seek end to end on a small ProductWorld set with a small trained model:
the Ray Data actor pool writes one shard per dataset file and a manifest, a re-run after
deleting one shard rewrites only that shard, and seek prints hits and writes a contact sheet
(a PNG of the documented size with the boxes drawn, an HTML page that headless Chromium shows)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def small_model(pw_dataset, tmp_path_factory) -> Path:
    """A tiny seeker trained for 30 steps on the mall train pairs, saved with its tokenizer."""
    import torch

    import date_core
    from date_core.data.io import iter_numpy_batches, read_table
    from date_core.data.transforms import BatchTransform
    from date_core.training.engine import fit
    from date_core.inference import save_checkpoint
    from date_core.text import load_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer(pw_dataset / "tokenizer")
    model = date_core.build_model("tiny", vocab_size=len(tok))
    transform = BatchTransform(tok, model.config.image_size, model.config.max_text_len, train=True)
    table = read_table(str(pw_dataset), "mall", "train")
    batches = [transform(b) for b in iter_numpy_batches(table, 16)]
    fit(model, lambda: batches, cfg_train={"lr": 1e-3, "warmup_steps": 3}, max_steps=30)
    folder = tmp_path_factory.mktemp("seeker") / "model"
    save_checkpoint(model, folder, tok)
    return folder


@pytest.fixture(scope="module")
def built_index(ray_module, small_model, pw_dataset, tmp_path_factory):
    from date_pipelines import index as index_cli

    out = tmp_path_factory.mktemp("index") / "catalogue"
    assert index_cli.main(["--model", str(small_model), "--data", str(pw_dataset), "--out", str(out),
                           "--replicas", "2", "--batch-size", "32"]) == 0
    return out


def test_index_writes_shards_and_manifest(built_index, pw_dataset, small_model):
    from date_core.data.io import list_datasets, read_table
    from date_core.retrieval.indexing import load_index, model_fingerprint

    manifest = json.loads((built_index / "index.json").read_text())
    datasets = list_datasets(str(pw_dataset))
    images = {i for d, s in datasets for i in read_table(str(pw_dataset), d, s, ["image_id"]).column("image_id").to_pylist()}
    assert manifest["count"] == len(images) and manifest["dim"] == 128  # the tiny preset's embed_dim
    assert len(manifest["shards"]) == len(datasets) == len(list((built_index / "embeddings").glob("*.parquet")))
    assert manifest["model_fingerprint"] == model_fingerprint(small_model)
    assert abs(manifest["norms"]["min"] - 1) < 1e-3 and abs(manifest["norms"]["max"] - 1) < 1e-3
    index = load_index(str(built_index))
    assert len(index) == len(images) == len(set(index.image_id))
    assert index.embeddings.shape == (len(images), manifest["dim"])
    # every image keeps every product its pairs name
    pairs = read_table(str(pw_dataset), "mall", "test", ["image_id", "item_id"]).to_pylist()
    row = {i: n for n, i in enumerate(index.image_id)}
    assert all(p["item_id"] in index.item_ids[row[p["image_id"]]] for p in pairs)


def test_rerun_after_deleting_one_shard_rewrites_only_that_shard(built_index, small_model, pw_dataset, capsys):
    from date_pipelines import index as index_cli

    shards = sorted((built_index / "embeddings").glob("*.parquet"))
    before = {p.name: p.stat().st_mtime_ns for p in shards}
    victim = shards[1]
    victim.unlink()
    capsys.readouterr()
    assert index_cli.main(["--model", str(small_model), "--data", str(pw_dataset), "--out", str(built_index)]) == 0
    log = capsys.readouterr().out
    assert f"{len(shards) - 1} already indexed by this model, 1 to embed" in log
    assert "images/s" in log and "ETA" in log
    after = {p.name: p.stat().st_mtime_ns for p in (built_index / "embeddings").glob("*.parquet")}
    assert set(after) == set(before)
    assert [n for n in after if after[n] != before.get(n)] == [victim.name]
    # nothing left to do: a third run embeds nothing
    assert index_cli.main(["--model", str(small_model), "--data", str(pw_dataset), "--out", str(built_index)]) == 0
    assert f"{len(shards)} already indexed by this model, 0 to embed" in capsys.readouterr().out


def test_index_refuses_a_folder_without_a_dataset(ray_module, small_model, tmp_path, capsys):
    from date_pipelines import index as index_cli

    assert index_cli.main(["--model", str(small_model), "--data", str(tmp_path / "nothing"),
                           "--out", str(tmp_path / "idx")]) == 2
    assert "no prepared dataset" in capsys.readouterr().err


def test_search_on_the_index_equals_brute_force(built_index):
    from date_core.retrieval.indexing import load_index
    from date_core.retrieval.search import brute_force, same_results

    index = load_index(str(built_index))
    queries = index.embeddings[::7] + 0.01
    s, i = index.search(queries, 5)
    rs, ri = brute_force(queries, index.embeddings, 5)
    assert same_results(i, s, ri, rs).all()
    _, ai = index.search(queries, 5, approximate=True)  # HNSW on a few hundred images: exact in practice
    assert (ai[:, 0] == ri[:, 0]).mean() >= 0.95


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_seek_prints_hits_and_writes_a_contact_sheet(built_index, small_model, pw_dataset, tmp_path, capsys):
    from date_pipelines import seek as seek_cli
    from date_core.retrieval.contact_sheet import BOX_COLOUR, sheet_size
    from date_core.data.io import read_table

    queries = read_table(str(pw_dataset), "mall", "test", ["query"]).column("query").to_pylist()[:2]
    out = tmp_path / "sheet"
    assert seek_cli.main([*queries, "--model", str(small_model), "--index", str(built_index), "--k", "3",
                          "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert all(repr(q) in printed for q in queries) and printed.count("  1  ") >= 2
    hits = json.loads((out / "hits.json").read_text())
    assert [len(h) for h in hits.values()] == [3, 3]
    first = next(iter(hits.values()))
    assert [h["rank"] for h in first] == [1, 2, 3] and first[0]["score"] >= first[1]["score"] >= first[2]["score"]
    # the PNG: the documented size, and the box colour drawn in every hit's thumbnail
    png = Image.open(out / "contact_sheet.png")
    assert png.format == "PNG" and png.size == sheet_size(2, 3)
    from date_core.retrieval.contact_sheet import CAPTION_H, LABEL_W, THUMB

    px = np.asarray(png.convert("RGB"))
    for q in range(2):
        for h in range(3):
            tile = px[q * (THUMB + CAPTION_H):q * (THUMB + CAPTION_H) + THUMB, LABEL_W + h * THUMB:LABEL_W + (h + 1) * THUMB]
            assert (tile == np.array(BOX_COLOUR)).all(axis=-1).sum() > 20, (q, h)
    # the HTML page, opened by headless Chromium, shows all 6 hits
    chromium = _chromium()
    if chromium is None:
        assert not os.environ.get("DATE_REQUIRE_CHROMIUM"), "chromium is required here (DATE_REQUIRE_CHROMIUM)"
        pytest.skip("headless Chromium not installed (CI installs Debian's chromium): HTML not rendered")
    profile = tmp_path / "chromium-profile"
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom",
         (out / "contact_sheet.html").as_uri()],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)}).stdout
    assert 'data-shown="6"' in dom, dom[:500]
    assert dom.count("class=\"hit\"") == 6 and all(q in dom for q in queries)


def test_seek_refuses_another_models_index(built_index, tmp_path, small_model, capsys):
    from date_pipelines import seek as seek_cli

    import torch

    from date_core.inference import load_model, save_checkpoint
    from date_core.text import load_tokenizer

    other = tmp_path / "other"
    model = load_model(small_model)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_checkpoint(model, other, load_tokenizer(small_model / "tokenizer"))
    assert seek_cli.main(["red mug", "--model", str(other), "--index", str(built_index), "--out", str(tmp_path)]) == 2
    assert "not the model that built" in capsys.readouterr().err


def test_rerank_recall_weight_zero_is_retrieval_alone(built_index, small_model, pw_dataset):
    from date_core.data.io import read_table
    from date_core.retrieval.indexing import load_index
    from date_core.inference import load_seeker
    from date_core.retrieval.seek import rerank_recall, seek

    index = load_index(str(built_index))
    seeker = load_seeker(small_model)
    pairs = read_table(str(pw_dataset), "mall", "test", ["query", "item_id"]).to_pylist()[:24]
    queries, items = [p["query"] for p in pairs], [p["item_id"] for p in pairs]
    res = rerank_recall(seeker, index, queries, items, [0.0, 5.0], candidates=6, batch_size=5, per_query=True)
    _, rows = index.search(seeker.encode_queries(queries), 5)
    plain_r1 = np.mean([item in index.item_ids[r[0]] for item, r in zip(items, rows)])
    plain_r5 = np.mean([any(item in index.item_ids[j] for j in r) for item, r in zip(items, rows)])
    assert res[0.0]["R@1"] == pytest.approx(plain_r1) and res[0.0]["R@5"] == pytest.approx(plain_r5)
    assert len(res[5.0]["hits@1"]) == 24 and 0 <= res[5.0]["R@1"] <= 1
    # seek with a weight ranks by similarity + weight x confidence
    hits = seek(seeker, index, queries[:2], 3, rerank_weight=5.0, candidates=6)
    for row in hits:
        assert [h.score for h in row] == sorted((h.score for h in row), reverse=True)
        assert all(h.score == pytest.approx(h.similarity + 5.0 * h.confidence, abs=1e-5) for h in row)
