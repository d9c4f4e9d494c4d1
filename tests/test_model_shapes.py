"""Model construction, the forward contract, presets, and gradient flow."""
from __future__ import annotations

import pytest
import torch

from date_core import build_model
from date_core.training.losses import DateCriterion
from date_core.model import ModelConfig, load_preset, resolve_model_config

from _model_synth import overfit_pairs, rows_to_batch, tokenizer_for


def _random_inputs(model, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    pixels = torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g)
    ids = torch.randint(5, cfg.vocab_size, (b, cfg.max_text_len), generator=g)
    mask = torch.ones_like(ids)
    mask[0, cfg.max_text_len // 2:] = 0  # one padded query
    return pixels, ids, mask


def check_contract(model, out, b):
    cfg = model.config
    d, k, dim = cfg.hidden_size, cfg.num_semantic_tokens, cfg.embed_dim
    assert out["image_emb"].shape == (b, dim) and out["query_emb"].shape == (b, dim)
    torch.testing.assert_close(out["image_emb"].norm(dim=-1), torch.ones(b))
    torch.testing.assert_close(out["query_emb"].norm(dim=-1), torch.ones(b))
    assert out["logit_scale"].dim() == 0 and float(out["logit_scale"]) > 1.0  # exp'd, not log
    assert out["pred_boxes"].shape == (b, 4)
    assert bool(((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all())
    assert out["pred_conf"].shape == (b,) and bool(((out["pred_conf"] > 0) & (out["pred_conf"] < 1)).all())
    assert out["image_tokens"].shape == (b, k, d) and out["query_tokens"].shape == (b, k, d)
    assert out["fused"].shape == (b, d)


HYBRID = {"stem_channels": [32, 64], "coord_channels": True, "patch_size": 3, "vision_layers": 2}


@pytest.mark.parametrize("preset,overrides", [("tiny", {}), ("small", {}), ("tiny", HYBRID)],
                         ids=["tiny", "small", "tiny-hybrid-stem"])
def test_forward_contract_runs_for_preset(preset, overrides):
    torch.manual_seed(0)
    model = build_model(preset, vocab_size=500, **overrides).eval()
    pixels, ids, mask = _random_inputs(model, b=2)
    with torch.no_grad():
        out = model(pixels, ids, mask)
    check_contract(model, out, 2)
    # the separately callable stages give the same result as forward (re-ranking relies on it)
    with torch.no_grad():
        img, txt = model.encode_image(pixels), model.encode_text(ids, mask)
        grounded = model.ground(img, txt)
    torch.testing.assert_close(img["emb"], out["image_emb"])
    torch.testing.assert_close(grounded["pred_boxes"], out["pred_boxes"])
    assert img["patches"].shape[1] == img["grid"] ** 2 == (64 if preset == "tiny" else 100)


def test_base_preset_has_vit_b16_and_bert_base_sizes():
    model = build_model("base")
    vit, bert = model.vision.backbone.config, model.text.backbone.config
    assert (vit.hidden_size, vit.num_hidden_layers, vit.num_attention_heads, vit.patch_size,
            vit.image_size, vit.intermediate_size) == (768, 12, 12, 16, 224, 3072)
    assert (bert.hidden_size, bert.num_hidden_layers, bert.intermediate_size, bert.vocab_size) == (768, 12, 3072, 30522)
    n_params = sum(p.numel() for p in model.parameters())
    assert 190e6 < n_params < 300e6, n_params  # ViT-B (86M) + BERT-base (109M) + seekers
    # width 768: the seeker's coordinate features once overflowed float32 here (NaN boxes)
    model.eval()
    pixels, ids, mask = _random_inputs(model, b=2)
    with torch.no_grad():
        out = model(pixels, ids, mask)
    check_contract(model, out, 2)
    assert all(bool(torch.isfinite(v).all()) for v in out.values() if torch.is_tensor(v))


def test_coordinate_features_are_finite_at_every_width():
    from date_core.model.seekers import sincos_coordinates

    for dim in (128, 192, 384, 512, 768, 1024):
        centres, feats = sincos_coordinates(14, dim, torch.device("cpu"))
        assert feats.shape == (196, dim) and bool(torch.isfinite(feats).all()), dim


def test_preset_sources_and_overrides(tmp_path):
    assert load_preset("tiny")["name"] == "tiny"
    cfg = resolve_model_config("tiny", vocab_size=123, hidden_size=64, aggregator_heads=2, fusion_heads=2)
    assert (cfg.vocab_size, cfg.hidden_size) == (123, 64)
    # a pipeline `model:` section
    cfg = resolve_model_config({"preset": "tiny", "overrides": {"num_semantic_tokens": 2}}, vocab_size=99)
    assert cfg.num_semantic_tokens == 2 and cfg.vocab_size == 99
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nimage_size: 48\npatch_size: 4\nstem_channels: [16]\n")
    cfg = resolve_model_config(str(path))
    assert (cfg.name, cfg.image_size, cfg.patch_size) == ("mine", 48, 4)
    assert isinstance(resolve_model_config(cfg), ModelConfig)


def test_bad_configs_fail_clearly():
    with pytest.raises(ValueError, match="unknown model config field"):
        build_model("tiny", hidden_sise=64)
    with pytest.raises(ValueError, match="unknown model preset"):
        build_model("huge")
    with pytest.raises(ValueError, match="multiple of"):
        build_model("tiny", image_size=100)
    model = build_model("tiny", vocab_size=50)
    with pytest.raises(ValueError, match=r"\[B, 3, S, S\]"):
        model.encode_image(torch.zeros(2, 1, 96, 96))


def test_gradients_reach_every_trainable_parameter():
    torch.manual_seed(0)
    rows = overfit_pairs(n_images=4)
    tok = tokenizer_for(rows)
    batch = rows_to_batch(rows, tok)
    model = build_model("tiny", vocab_size=len(tok), max_text_len=8)
    crit = DateCriterion()
    out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    crit.total(crit(out, batch)).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing}"
    dead = [n for n, p in model.named_parameters()
            if p.requires_grad and not bool(p.grad.abs().sum() > 0) and "word_embeddings" not in n]
    assert not dead, f"all-zero gradient for {dead}"
    used = batch["input_ids"][batch["attention_mask"].bool()].unique()  # [PAD] is frozen by design
    word_grad = model.text.backbone.embeddings.word_embeddings.weight.grad
    assert bool((word_grad[used].abs().sum(dim=1) > 0).all())  # every token in the batch learns
