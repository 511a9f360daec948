"""ResNet-18 in its CIFAR form (3x3 stem, no max-pool, BasicBlocks [2, 2, 2, 2]) with GroupNorm.

Meant for servers with a GPU; the client partition stays small at the default cut. GroupNorm
replaces BatchNorm throughout, so no partition keeps running statistics. Parameter counts with
10 classes:

======  =============  =============  ===================
cut     client params  server params  cut floats / sample
======  =============  =============  ===================
stem    1,856          11,172,106     65,536 (64x32x32)
layer1  149,824        11,024,138     65,536 (64x32x32)
layer2  675,392        10,498,570     32,768 (128x16x16)
======  =============  =============  ===================

Total 11,173,962.
"""

from __future__ import annotations

import torch
from torch import nn

from models.base import ModelInfo, Stage, group_norm

RESNET18 = ModelInfo(
    name="resnet18",
    input_shape=(3, 32, 32),
    cuts=("stem", "layer1", "layer2"),
    default_cut="stem",
    description="CIFAR ResNet-18 with GroupNorm (3x3 stem, no max-pool); for GPU servers",
)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection; a 1x1 projection when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False
        )
        self.norm1 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.norm2 = group_norm(out_channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                group_norm(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        # Out-of-place add: the input may be a received activation that needs its own gradient.
        return self.relu(out + self.shortcut(x))


def _layer(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        BasicBlock(in_channels, out_channels, stride), BasicBlock(out_channels, out_channels)
    )


def resnet18_stages(num_classes: int) -> list[Stage]:
    """Named stages of `resnet18`: stem, four residual layers, and the pooled linear head."""
    stem = nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=3, padding=1, bias=False), group_norm(64), nn.ReLU()
    )
    return [
        ("stem", stem),
        ("layer1", _layer(64, 64, stride=1)),
        ("layer2", _layer(64, 128, stride=2)),
        ("layer3", _layer(128, 256, stride=2)),
        ("layer4", _layer(256, 512, stride=2)),
        ("head", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes))),
    ]
