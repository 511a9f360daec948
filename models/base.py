"""Shared vocabulary of the model zoo: model metadata, a split model, and the norm helper.

Every model is described as an ordered list of named stages; a cut point is the name of the
last stage that stays on the device, so splitting never changes how the weights are built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

# A model definition: the ordered, named stages of the unsplit network.
Stage = tuple[str, nn.Module]
StageBuilder = Callable[[int], list[Stage]]


@dataclass(frozen=True)
class ModelInfo:
    """Static description of a registered model."""

    name: str
    input_shape: tuple[int, ...]
    cuts: tuple[str, ...]
    default_cut: str
    description: str


@dataclass
class SplitModel:
    """A model cut in two: `client` runs on the device, `server` turns activations into logits."""

    client: nn.Module
    server: nn.Module
    cut: str
    info: ModelInfo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run both partitions in one process, i.e. the unsplit forward pass."""
        return self.server(self.client(x))

    def client_numel(self) -> int:
        """Number of trainable parameters in the client partition (its gradient size)."""
        return sum(p.numel() for p in self.client.parameters() if p.requires_grad)

    def server_numel(self) -> int:
        """Number of trainable parameters in the server partition."""
        return sum(p.numel() for p in self.server.parameters() if p.requires_grad)


def group_norm(
    channels: int, max_groups: int = 32, min_channels_per_group: int = 4
) -> nn.GroupNorm:
    """GroupNorm with a group count that suits `channels`.

    GroupNorm normalises each sample on its own, so unlike BatchNorm it carries no running
    statistics that would mix (or mismatch) the label distributions of non-IID devices.
    """
    groups = max(1, min(max_groups, channels // min_channels_per_group))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


def conv_gn_relu(in_channels: int, out_channels: int, pool: bool = False) -> nn.Sequential:
    """3x3 same-padding convolution, GroupNorm, ReLU, and an optional 2x2 max-pool."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        group_norm(out_channels),
        nn.ReLU(),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)
