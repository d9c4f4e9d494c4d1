"""Instance-level retrieval scoring (date_core.retrieval.instance) and the plain dual encoder baseline."""
from __future__ import annotations

import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from date_core import batch as B
from date_core.retrieval.instance import (QueryFeatures, choose_text_weight, encode_gallery, encode_queries, evaluate,
                                instance_scores, labels, random_ranking, rank)
from date_core.training.losses import ContrastiveCriterion, DateCriterion
from date_core.model import build_model, resolve_model_config
from date_core.model.dual import DualEncoder


def _unit(*rows: list[float]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_token_pool_finds_each_product_where_the_mean_blends_them():
    # gallery: three products on the axes; the query image shows products 0 and 1 (two tokens);
    # its mean embedding sits between them and ties with a decoy on the diagonal
    gallery = _unit([1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0])
    tokens = _unit([1, 0, 0], [0, 1, 0])[None]  # [1, K=2, D]
    q = QueryFeatures(text=_unit([0, 0, 1]), image=_unit([1, 1, 0]), tokens=tokens)
    by_tokens = instance_scores(q, gallery, text_weight=0.0, image_pool="tokens")
    by_mean = instance_scores(q, gallery, text_weight=0.0, image_pool="mean")
    assert rank(by_mean, 1).tolist() == [[3]]  # the blend wins under the mean
    assert set(rank(by_tokens, 2)[0].tolist()) <= {0, 1, 3} and by_tokens[0, 0] == pytest.approx(1.0)
    assert by_tokens[0, 2] == pytest.approx(0.0, abs=1e-6)
    # the caption side alone ranks what the caption names
    assert rank(instance_scores(q, gallery, text_weight=1.0), 1).tolist() == [[2]]
    mixed = instance_scores(q, gallery, text_weight=0.25, image_pool="tokens")
    assert torch.allclose(mixed, 0.25 * (q.text @ gallery.t()) + 0.75 * by_tokens)


def test_scores_are_chunk_independent_and_validated():
    g = torch.Generator().manual_seed(0)
    q = QueryFeatures(F.normalize(torch.randn(37, 8, generator=g), dim=-1),
                      F.normalize(torch.randn(37, 8, generator=g), dim=-1),
                      F.normalize(torch.randn(37, 3, 8, generator=g), dim=-1))
    gallery = F.normalize(torch.randn(50, 8, generator=g), dim=-1)
    for pool in ("mean", "tokens"):
        assert torch.allclose(instance_scores(q, gallery, 0.5, pool, chunk=7), instance_scores(q, gallery, 0.5, pool))
    with pytest.raises(ValueError, match="image_pool"):
        instance_scores(q, gallery, 0.5, "max")
    with pytest.raises(ValueError, match="text_weight"):
        instance_scores(q, gallery, 1.5)
    with pytest.raises(ValueError, match="semantic tokens"):
        instance_scores(QueryFeatures(q.text, q.image), gallery, 0.5, "tokens")


def test_choose_text_weight_picks_the_informative_side():
    # captions identify each query's product exactly, images are noise: weight 1.0 must win
    g = torch.Generator().manual_seed(1)
    gallery = F.normalize(torch.randn(40, 16, generator=g), dim=-1)
    want = torch.arange(20)
    q = QueryFeatures(text=gallery[want].clone(), image=F.normalize(torch.randn(20, 16, generator=g), dim=-1))
    qlabels = [[f"p{int(i)}"] for i in want]
    glabels = [f"p{i}" for i in range(40)]
    w, table = choose_text_weight(q, gallery, qlabels, glabels)
    assert table[w] == max(table.values()) == pytest.approx(1.0) and table[0.0] < 0.5
    assert w >= 0.5  # ties are broken towards the middle, never towards the uninformative side
    m = evaluate(q, gallery, qlabels, glabels, 1.0)
    assert m["inst/official/mAP@10"] == pytest.approx(1.0)
    rnd = random_ranking(20, 40, seed=0)
    assert rnd.shape == (20, 40) and all(len(set(r.tolist())) == 40 for r in rnd)


def test_labels_read_instance_ids_or_fall_back_to_the_item():
    table = pa.table({"item_id": ["a", "b", "c"],
                      "instance_ids": pa.array([["a", "x", "a"], None, ["c"]], pa.list_(pa.string()))})
    assert labels(table) == [["a", "x", "a"], ["b"], ["c"]]
    assert labels(table, gallery=True) == ["a", "b", "c"]


@pytest.mark.parametrize("kind", ["date", "dual"])
def test_models_encode_both_sides(kind):
    torch.manual_seed(0)
    cfg = resolve_model_config("tiny", vocab_size=100, max_text_len=8)
    model = build_model(cfg) if kind == "date" else DualEncoder(cfg)
    batch = {B.PIXEL_VALUES: torch.randn(3, 3, cfg.image_size, cfg.image_size),
             B.INPUT_IDS: torch.randint(1, 100, (3, 8)), B.ATTENTION_MASK: torch.ones(3, 8, dtype=torch.long)}
    gallery = encode_gallery(model, [batch, batch])
    q = encode_queries(model, [batch])
    assert gallery.shape == (6, cfg.embed_dim) and q.text.shape == q.image.shape == (3, cfg.embed_dim)
    assert torch.allclose(gallery.norm(dim=-1), torch.ones(6), atol=1e-5)
    if kind == "date":
        assert q.tokens.shape == (3, cfg.num_semantic_tokens, cfg.embed_dim)
    else:
        assert q.tokens is None


def test_dual_encoder_trains_with_the_contrastive_criterion_alone():
    from date_core.training.engine import build_optimizer, train_step

    torch.manual_seed(0)
    cfg = resolve_model_config("tiny", vocab_size=50, max_text_len=6)
    model = DualEncoder(cfg)
    batch = {B.PIXEL_VALUES: torch.randn(8, 3, cfg.image_size, cfg.image_size),
             B.INPUT_IDS: torch.randint(1, 50, (8, 6)), B.ATTENTION_MASK: torch.ones(8, 6, dtype=torch.long),
             B.ITEM_KEY: torch.arange(8)}
    crit = ContrastiveCriterion(gather=False)
    opt = build_optimizer(model, {"lr": 1e-3, "weight_decay": 0.0})
    first = train_step(model, crit, batch, opt)["loss/retrieval"]
    for _ in range(30):
        last = train_step(model, crit, batch, opt)["loss/retrieval"]
    assert last < 0.5 * first  # it memorises a fixed batch
    with pytest.raises(KeyError):  # DATE's full criterion needs the grounding outputs
        DateCriterion(gather=False)(model(batch[B.PIXEL_VALUES], batch[B.INPUT_IDS], batch[B.ATTENTION_MASK]), batch)


@pytest.mark.integration
def test_evaluate_cli_instance_mode(ray_module, tmp_path, capsys):
    """``evaluate.py --instance`` on a prepared instance-mode dataset: Product1M's metrics of
    multi/test against single/gallery, the rule chosen on multi/val unless given."""
    import json
    from pathlib import Path

    from date_core.inference import save_checkpoint
    from date_core.text import load_tokenizer
    from date_pipelines import evaluate as evaluate_cli
    from date_pipelines import prepare

    data = str(tmp_path / "pwi")
    assert prepare.main(["synth", "--instance", "--queries", "40", "--items", "20", "--distractors", "6",
                         "--splits", "train=0.4,val=0.3,test=0.3", "--seed", "0", "--out", data,
                         "--vocab-size", "300", "--images-per-task", "16"]) == 0
    tok = load_tokenizer(Path(data) / "tokenizer")
    torch.manual_seed(0)
    save_checkpoint(build_model("tiny", vocab_size=len(tok)), tmp_path / "model", tok)

    out = tmp_path / "inst.json"
    assert evaluate_cli.main(["--instance", "--model", str(tmp_path / "model"), "--data", data,
                              "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["chosen_on"] == "multi/val" and m["image_pool"] in ("mean", "tokens")
    assert m["inst/n_gallery"] == 26 and m["inst/n_queries"] > 0
    for name in ("mAP", "Prec", "mAR"):
        for n in (10, 50, 100):
            assert 0.0 <= m[f"inst/official/{name}@{n}"] <= 1.0
    assert "inst/textbook/mAP@10" in capsys.readouterr().out

    fixed = tmp_path / "fixed.json"
    assert evaluate_cli.main(["--instance", "--model", str(tmp_path / "model"), "--data", data, "--out", str(fixed),
                              "--text-weight", "1.0", "--image-pool", "tokens"]) == 0
    f = json.loads(fixed.read_text())
    assert (f["text_weight"], f["image_pool"]) == (1.0, "tokens") and "chosen_on" not in f
    # a dataset without the instance layout is refused with a message, not a traceback
    assert evaluate_cli.main(["--instance", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "none"),
                              "--out", str(tmp_path / "x.json")]) == 2
    assert "no Parquet files" in capsys.readouterr().err
