"""Checkpoints (save, load, identical outputs) and the seeker on raw strings and PIL images."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import date_core
from date_core.inference import Seeker, load_model, save_checkpoint

from _model_synth import make_scene, overfit_pairs, rows_to_batch, tokenizer_for


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model briefly trained on drawn scenes, saved with its tokenizer."""
    from date_core.training.engine import build_optimizer, train_step
    from date_core.training.losses import DateCriterion

    torch.manual_seed(0)
    rows = overfit_pairs(n_images=8, seed=2)
    tok = tokenizer_for(rows)
    batch = rows_to_batch(rows, tok, max_len=8)
    model = date_core.build_model("tiny", vocab_size=len(tok), max_text_len=8)
    opt = build_optimizer(model, {"lr": 2e-3})
    for _ in range(5):
        train_step(model, DateCriterion(), batch, opt)
    folder = tmp_path_factory.mktemp("ckpt") / "seeker"
    save_checkpoint(model, folder, tok, extra={"step": 5})
    return model.eval(), tok, batch, folder, rows


def test_checkpoint_layout_and_identical_outputs(trained):
    model, _, batch, folder, _ = trained
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "tokenizer"}
    meta = json.loads((folder / "config.json").read_text())
    assert meta["format"] == "date-seeker" and meta["extra"] == {"step": 5}
    assert meta["model"]["vocab_size"] == model.config.vocab_size
    loaded = load_model(folder)
    assert not loaded.training
    with torch.no_grad():
        a = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        b = loaded(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    for key in ("image_emb", "query_emb", "pred_boxes", "pred_conf", "fused", "logit_scale"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_load_rejects_what_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a DATE checkpoint"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a date-seeker checkpoint"):
        load_model(tmp_path)


def test_load_seeker_end_to_end_on_strings_and_pil_images(trained):
    model, tok, batch, folder, rows = trained
    seeker = date_core.load_seeker(str(folder))
    assert isinstance(seeker, Seeker)
    queries = [r["query"] for r in rows]
    images = [r["image"] for r in rows]
    q = seeker.encode_queries(queries)
    g = seeker.encode_images(images[::2])  # each image once
    assert q.shape == (16, model.config.embed_dim) and g.shape == (8, model.config.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, rtol=1e-5)
    with torch.no_grad():  # raw-string path == the tensor path of the training batch
        np.testing.assert_allclose(q, model.encode_text(batch["input_ids"], batch["attention_mask"])["emb"].numpy(),
                                   atol=1e-5)
    scores, idx = seeker.search(q, g, k=3)
    assert scores.shape == idx.shape == (16, 3) and np.all(np.diff(scores, axis=1) <= 1e-6)

    # grounding on a non-square image: boxes come back in the original frame's pixels, and they
    # equal the letterbox prediction mapped back exactly
    rng = __import__("random").Random(0)
    wide, boxes = make_scene(rng, [("red", "ball"), ("blue", "box")], size=(200, 120))
    res = seeker.ground([wide, images[0]], ["red ball", queries[0]])
    assert res.boxes.shape == (2, 4) and res.confidence.shape == (2,)
    assert np.all(res.boxes[0] >= 0) and res.boxes[0, 2] <= 200 and res.boxes[0, 3] <= 120
    assert np.all(res.boxes[:, 2] >= res.boxes[:, 0]) and np.all((res.confidence > 0) & (res.confidence < 1))
    from date_core.imaging import Letterbox, letterbox_cxcywh_to_xyxy_pixels, preprocess_pil
    from date_core.text import tokenize
    pixels, _ = preprocess_pil([wide], 96)
    ids, mask = tokenize(tok, ["red ball"], 8)
    with torch.no_grad():
        pred = model(torch.from_numpy(pixels), torch.from_numpy(ids), torch.from_numpy(mask))["pred_boxes"]
    np.testing.assert_allclose(res.boxes[0], letterbox_cxcywh_to_xyxy_pixels(pred[0].numpy(), Letterbox(200, 120, 96)),
                               atol=1e-3)

    s2, i2 = seeker.search_images(queries[:3], images[::2], k=4, rerank_weight=1.0)
    assert s2.shape == i2.shape == (3, 4) and np.all(np.diff(s2, axis=1) <= 1e-6)
    assert all(sorted(r) == sorted(set(r)) for r in i2.tolist())  # a permutation of the top-k
    with pytest.raises(ValueError, match="pairs image i with query i"):
        seeker.ground([wide], ["a", "b"])
    with pytest.raises(TypeError, match="list of strings"):
        seeker.encode_queries("red ball")
