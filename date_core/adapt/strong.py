"""Strong photometric augmentation of the student's target view (weak-strong self-training).

Unbiased Teacher and Adaptive Teacher let the teacher label a weakly augmented target image and
train the student on a *strongly* augmented copy with that label: colour jitter, grayscale,
blur and cutout. Without the gap, a pseudo label that the teacher got right is one the student
already predicts (it is the teacher's average), so it carries no information, while the wrong
ones still teach their mistakes; ``bench/pgda_ablation.py --label-filter right`` is the
diagnostic that measures it (docs/experiments.md). The strong view asks the student to find the product in a
degraded frame, which is also what live-stream frames look like.

Every operation is photometric (pixels move nowhere), so boxes stay valid. Parameters follow
Unbiased Teacher's: colour jitter 0.4 / 0.4 / 0.4 with probability 0.8, grayscale 0.2, Gaussian
blur with sigma in [0.1, 2] with probability 0.5, and up to three cutout rectangles of 2-10% of
the image, each with probability 0.7 / 0.5 / 0.3.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from ..batch import IMAGE_MEAN, IMAGE_STD

CUTOUT_PROBS = (0.7, 0.5, 0.3)


def strong_augment(pixel_values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[B, 3, S, S]`` normalised pixels -> a strongly augmented copy (same shape and dtype).

    Works in [0, 1] RGB (un-normalised, clipped) and normalises back; per-sample randomness
    from ``generator`` (the global generator when None)."""
    if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"strong_augment expects [B, 3, S, S] pixels, got {tuple(pixel_values.shape)}")
    dev, dtype = pixel_values.device, pixel_values.dtype
    n, _, h, w = pixel_values.shape
    mean = torch.tensor(IMAGE_MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, device=dev).view(1, 3, 1, 1)
    x = (pixel_values.float() * std + mean).clamp(0, 1)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator).to(dev)

    def per_sample(t: torch.Tensor) -> torch.Tensor:
        return t.view(n, 1, 1, 1)

    # colour jitter (brightness, contrast, saturation), all on or all off per image
    jitter = per_sample(rand(n) < 0.8)
    bright = per_sample(1 + (rand(n) * 2 - 1) * 0.4)
    contrast = per_sample(1 + (rand(n) * 2 - 1) * 0.4)
    sat = per_sample(1 + (rand(n) * 2 - 1) * 0.4)
    y = (x * bright).clamp(0, 1)
    y = ((y - y.mean(dim=(1, 2, 3), keepdim=True)) * contrast + y.mean(dim=(1, 2, 3), keepdim=True)).clamp(0, 1)
    g = _luma(y)
    y = ((y - g) * sat + g).clamp(0, 1)
    x = torch.where(jitter, y, x)
    # grayscale
    x = torch.where(per_sample(rand(n) < 0.2), _luma(x).expand_as(x), x)
    # Gaussian blur with a per-image sigma
    blur = rand(n) < 0.5
    sigma = 0.1 + rand(n) * 1.9
    if bool(blur.any()):
        x = torch.where(per_sample(blur), _blur(x, sigma), x)
    # cutout: grey rectangles (the product may lose a part, never its box)
    for p in CUTOUT_PROBS:
        on = rand(n) < p
        area = 0.02 + rand(n) * 0.08
        aspect = torch.exp((rand(n) * 2 - 1) * 1.0)
        ch = (torch.sqrt(area * aspect) * h).clamp(1, h).long()
        cw = (torch.sqrt(area / aspect) * w).clamp(1, w).long()
        y0 = (rand(n) * (h - ch + 1).float()).long()
        x0 = (rand(n) * (w - cw + 1).float()).long()
        rows = torch.arange(h, device=dev).view(1, h, 1)
        cols = torch.arange(w, device=dev).view(1, 1, w)
        box = ((rows >= y0.view(n, 1, 1)) & (rows < (y0 + ch).view(n, 1, 1))
               & (cols >= x0.view(n, 1, 1)) & (cols < (x0 + cw).view(n, 1, 1)) & on.view(n, 1, 1))
        x = torch.where(box[:, None], torch.full_like(x, 0.5), x)
    return ((x - mean) / std).to(dtype)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of ``[B, 3, H, W]`` RGB -> ``[B, 1, H, W]``."""
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, 3, H, W]``, image ``i`` with ``sigma[i]``, reflect padding:
    one grouped convolution per axis (kernels of the largest sigma's radius, zero beyond their own)."""
    n, c, h, w = x.shape
    radius = max(1, int(round(2 * float(sigma.max()))))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t[None] / sigma[:, None].to(x.dtype)) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)            # [B*3, 2r+1]
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, 0, 0), mode="reflect")
    y = F.conv2d(y, k.view(n * c, 1, 1, -1), groups=n * c)
    y = F.pad(y, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(y, k.view(n * c, 1, -1, 1), groups=n * c).view(n, c, h, w)
