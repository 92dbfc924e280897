"""EfficientNet-Lite0 in plain torch, with timm's tensor names and random initialisation.

The network is Tan & Le's EfficientNet-B0 in its "Lite" form (ReLU6, no squeeze-and-excitation,
stem and head of fixed width), as timm builds it under ``efficientnet_lite0``: the same modules
registered in the same order, so a state dict of either loads into the other and the ImageNet
file (named by position after timm's order) fits. Building it here rather than through timm
saves importing timm and, through it, torchvision and ``torch._dynamo``: about 10 s of start-up
on a 2-core machine in every process that trains or loads a model. ``tests/test_backbones.py``
checks names, shapes, the seeded initialisation and the outputs against timm's when it is
installed.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["EfficientNetLite0", "STAGES"]

#: Stages after the stem: (block kind, repeats, kernel, first stride, expansion, output channels).
#: ``"ds"`` is a depthwise-separable block, ``"ir"`` an inverted residual (MobileNetV2).
STAGES = (
    ("ds", 1, 3, 1, 1, 16),
    ("ir", 2, 3, 2, 6, 24),
    ("ir", 2, 5, 2, 6, 40),
    ("ir", 3, 3, 2, 6, 80),
    ("ir", 3, 5, 1, 6, 112),
    ("ir", 4, 5, 2, 6, 192),
    ("ir", 1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
CLASSES = 1000


class NormAct(nn.BatchNorm2d):
    """Batch norm followed by ReLU6 (or nothing), tensor names as a plain ``BatchNorm2d``.

    The activation is the ``act`` attribute, where
    :func:`~anomaly_dask.backbones.fold_batchnorm` looks for it when it folds the norm away.
    """

    def __init__(self, channels: int, act: bool = True) -> None:
        super().__init__(channels)
        self.act: nn.Module = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.act(super().forward(x))


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """A bias-free convolution padded symmetrically by ``kernel // 2``."""
    return nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)


class DepthwiseSeparable(nn.Module):
    """Depthwise ``kernel`` x ``kernel`` convolution, then a pointwise one (no expansion)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.conv_dw = _conv(cin, cin, kernel, stride, groups=cin)
        self.bn1 = NormAct(cin)
        self.conv_pw = _conv(cin, cout, 1)
        self.bn2 = NormAct(cout, act=False)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        y = self.bn2(self.conv_pw(self.bn1(self.conv_dw(x))))
        return x + y if self.skip else y


class InvertedResidual(nn.Module):
    """Pointwise expansion by ``expand``, depthwise convolution, linear pointwise projection."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.conv_pw = _conv(cin, mid, 1)
        self.bn1 = NormAct(mid)
        self.conv_dw = _conv(mid, mid, kernel, stride, groups=mid)
        self.bn2 = NormAct(mid)
        self.conv_pwl = _conv(mid, cout, 1)
        self.bn3 = NormAct(cout, act=False)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        y = self.bn3(self.conv_pwl(self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))))
        return x + y if self.skip else y


def _stage(kind: str, repeats: int, kernel: int, stride: int, expand: int, cin: int, cout: int) -> nn.Sequential:
    blocks: list[nn.Module] = []
    for i in range(repeats):
        first_in, s = (cin, stride) if i == 0 else (cout, 1)
        if kind == "ds":
            blocks.append(DepthwiseSeparable(first_in, cout, kernel, s))
        else:
            blocks.append(InvertedResidual(first_in, cout, kernel, s, expand))
    return nn.Sequential(*blocks)


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0: stem, seven stages (``blocks``), head and ImageNet classifier.

    Weights are drawn as timm (1.0) draws them: each module's default initialisation at
    construction, then, module by module, convolutions from N(0, 2 / fan-out) (fan-out per
    group), batch norms at weight 1 and bias 0, the classifier uniformly within
    1 / sqrt(fan-out) and biases 0. So under one torch seed the weights equal timm's.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv_stem = _conv(3, STEM_CHANNELS, 3, 2)
        self.bn1 = NormAct(STEM_CHANNELS)
        # timm's block builder first instantiates an 8-channel squeeze-and-excitation layer
        # (two 1x1 convolutions with bias) to probe its arguments, then drops it; drawing the
        # same two convolutions here keeps the random stream, hence a seed's weights, timm's
        _ = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        stages, cin = [], STEM_CHANNELS
        for kind, repeats, kernel, stride, expand, cout in STAGES:
            stages.append(_stage(kind, repeats, kernel, stride, expand, cin, cout))
            cin = cout
        self.blocks = nn.Sequential(*stages)
        self.conv_head = _conv(cin, HEAD_CHANNELS, 1)
        self.bn2 = NormAct(HEAD_CHANNELS)
        self.classifier = nn.Linear(HEAD_CHANNELS, CLASSES)
        for module in self.modules():
            _initialise(module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (N, 1000) of a normalised batch (N, 3, H, W)."""
        x = self.bn2(self.conv_head(self.blocks(self.bn1(self.conv_stem(x)))))
        return self.classifier(x.mean(dim=(2, 3)))


def _initialise(module: nn.Module) -> None:
    """Draw one module's weights as timm's EfficientNet initialisation does."""
    if isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        bound = 1.0 / math.sqrt(module.weight.shape[0])
        nn.init.uniform_(module.weight, -bound, bound)
        nn.init.zeros_(module.bias)
