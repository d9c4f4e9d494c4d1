"""Strong photometric augmentation of the student's target view (weak-strong self-training)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from date_core import batch as B
from date_core.adapt import selftrain
from date_core.adapt.strong import strong_augment
from date_core.batch import IMAGE_MEAN, IMAGE_STD


def _pixels(n: int = 16, s: int = 32) -> torch.Tensor:
    rgb = torch.rand(n, 3, s, s, generator=torch.Generator().manual_seed(0))
    return (rgb - torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGE_STD).view(1, 3, 1, 1)


def test_strong_augment_changes_pixels_in_range_and_is_seeded():
    x = _pixels()
    a = strong_augment(x, torch.Generator().manual_seed(1))
    b = strong_augment(x, torch.Generator().manual_seed(1))
    c = strong_augment(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.dtype == x.dtype and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    rgb = a * torch.tensor(IMAGE_STD).view(1, 3, 1, 1) + torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    assert rgb.min() >= -1e-5 and rgb.max() <= 1 + 1e-5            # still a valid image
    changed = (a - x).abs().flatten(1).amax(dim=1) > 1e-3
    assert changed.float().mean() > 0.8                               # nearly every image is altered
    # grayscale and cutout show up: some images lose their colour, some get flat grey patches
    rgb_std = rgb.std(dim=1).flatten(1).amax(dim=1)
    assert (rgb_std < 1e-4).any()
    assert ((rgb - 0.5).abs() < 1e-5).all(dim=1).flatten(1).any(dim=1).any()
    with pytest.raises(ValueError, match=r"\[B, 3, S, S\]"):
        strong_augment(x[:, :1])


def test_adaptation_step_augments_only_the_target_batch(monkeypatch):
    seen = {}

    def fake_train_step(model, criterion, batch, optimizer, scheduler, *, target_batch=None, aligner=None, **kw):
        seen["source"], seen["target"] = batch[B.PIXEL_VALUES], target_batch[B.PIXEL_VALUES]
        return {"stepped": False}

    monkeypatch.setattr("date_core.training.engine.train_step", fake_train_step)
    src = {B.PIXEL_VALUES: _pixels(), B.BOXES: torch.rand(16, 4)}
    tgt = {B.PIXEL_VALUES: _pixels().numpy(), B.BOXES: np.random.rand(16, 4).astype(np.float32)}
    selftrain.adaptation_step(None, None, src, None, target_batch=tgt, strong_aug=True)
    assert torch.equal(seen["source"], src[B.PIXEL_VALUES])
    assert not torch.allclose(seen["target"], torch.from_numpy(tgt[B.PIXEL_VALUES]))
    selftrain.adaptation_step(None, None, src, None, target_batch=tgt, strong_aug=False)
    assert np.array_equal(np.asarray(seen["target"]), tgt[B.PIXEL_VALUES])   # off: untouched


def test_blur_keeps_the_mass_and_spreads_with_sigma():
    from date_core.adapt.strong import _blur

    delta = torch.zeros(2, 3, 33, 33)
    delta[:, :, 16, 16] = 1.0
    out = _blur(delta, torch.tensor([0.5, 2.0]))
    assert torch.allclose(out.sum(dim=(2, 3)), torch.ones(2, 3), atol=1e-5)
    assert out[0, 0, 16, 16] > 0.35 > out[1, 0, 16, 16]           # the larger sigma spreads more
    assert out[1, 0, 16, 19] > out[0, 0, 16, 19]
