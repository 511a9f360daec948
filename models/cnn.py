"""Small convolutional networks for digits, Fashion-MNIST and CIFAR-10, sized for CPU devices.

Every convolution is followed by GroupNorm and ReLU (no BatchNorm: see `models.base.group_norm`).
Parameter counts with 10 classes:

==========  ======  =============  =============  ===================
model       cut     client params  server params  cut floats / sample
==========  ======  =============  =============  ===================
digits_cnn  conv1   192            9,834          1,024 (16x8x8)
digits_cnn  conv2   4,896          5,130          512 (32x4x4)
digits_cnn_fc  fc1  21,312         330            32
fmnist_cnn  conv1   192            206,826        3,136 (16x14x14)
fmnist_cnn  conv2   4,896          202,122        1,568 (32x7x7)
fmnist_cnn  fc1     205,728        1,290          128
cifar_cnn   block1  960            356,298        8,192 (32x16x16)
cifar_cnn   block2  19,584         337,674        4,096 (64x8x8)
==========  ======  =============  =============  ===================

Totals: digits_cnn 10,026; digits_cnn_fc 21,642; fmnist_cnn 207,018; cifar_cnn 357,258.
"""

from __future__ import annotations

from torch import nn

from models.base import ModelInfo, Stage, conv_gn_relu

DIGITS_CNN = ModelInfo(
    name="digits_cnn",
    input_shape=(1, 8, 8),
    cuts=("conv1", "conv2"),
    default_cut="conv1",
    description="CNN conv16-conv32-pool-linear for 8x8 digits",
)

DIGITS_CNN_FC = ModelInfo(
    name="digits_cnn_fc",
    input_shape=(1, 8, 8),
    cuts=("conv1", "conv2", "fc1"),
    default_cut="fc1",
    description="CNN conv16-conv32-pool-fc32 for 8x8 digits; by default the devices hold all but the head",
)

FMNIST_CNN = ModelInfo(
    name="fmnist_cnn",
    input_shape=(1, 28, 28),
    cuts=("conv1", "conv2", "fc1"),
    default_cut="conv1",
    description="CNN conv16-pool-conv32-pool-fc128 for 28x28 Fashion-MNIST",
)

CIFAR_CNN = ModelInfo(
    name="cifar_cnn",
    input_shape=(3, 32, 32),
    cuts=("block1", "block2"),
    default_cut="block1",
    description="CNN of three conv blocks (32-64-128, each pooled) and fc128 for CIFAR-10",
)


def digits_cnn_stages(num_classes: int) -> list[Stage]:
    """Named stages of `digits_cnn`.

    The first convolution keeps the full 8x8 grid: pooling that early would leave the second
    convolution almost nothing to see.
    """
    return [
        ("conv1", conv_gn_relu(1, 16)),
        ("conv2", conv_gn_relu(16, 32, pool=True)),
        # A single linear layer: on 8x8 digits a hidden layer here only slowed learning down.
        ("head", nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, num_classes))),
    ]


def digits_cnn_fc_stages(num_classes: int) -> list[Stage]:
    """Named stages of `digits_cnn_fc`: `digits_cnn`'s convolutions, then a 32-unit dense layer.
    Cut at `fc1` the devices hold 98 % of the weights behind a narrow bottleneck, so random
    (never trained) client layers are worth far less than trained ones: the convolutional preset
    of the gated accuracy study (docs/results.md)."""
    return [
        ("conv1", conv_gn_relu(1, 16)),
        ("conv2", conv_gn_relu(16, 32, pool=True)),
        ("fc1", nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 32), nn.ReLU())),
        ("head", nn.Linear(32, num_classes)),
    ]


def fmnist_cnn_stages(num_classes: int) -> list[Stage]:
    """Named stages of `fmnist_cnn`; pooling sits in the client so the cut tensor is 4x smaller.
    At `fc1` the devices hold both convolutions and the first dense layer (99 % of the weights)."""
    return [
        ("conv1", conv_gn_relu(1, 16, pool=True)),
        ("conv2", conv_gn_relu(16, 32, pool=True)),
        ("fc1", nn.Sequential(nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU())),
        ("head", nn.Linear(128, num_classes)),
    ]


def cifar_cnn_stages(num_classes: int) -> list[Stage]:
    """Named stages of `cifar_cnn`: three pooled conv blocks, then a two-layer classifier."""
    return [
        ("block1", conv_gn_relu(3, 32, pool=True)),
        ("block2", conv_gn_relu(32, 64, pool=True)),
        ("block3", conv_gn_relu(64, 128, pool=True)),
        (
            "head",
            nn.Sequential(
                nn.Flatten(), nn.Linear(128 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, num_classes)
            ),
        ),
    ]
