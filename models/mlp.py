"""Multi-layer perceptrons whose devices can hold most of the weights: ``digits_mlp`` for
scikit-learn's 8x8 digits (the smallest model of the zoo) and ``fmnist_mlp`` of the same shape
for 28x28 Fashion-MNIST.

``digits_mlp``: 64 -> 64 -> 32 -> classes (the input is flattened inside the first stage).
Parameters with 10 classes:

=====  =============  =============  ===================
cut    client params  server params  cut floats / sample
=====  =============  =============  ===================
fc1    4,160          2,410          64
fc2    6,240          330            32
=====  =============  =============  ===================

Total 6,570. ``fmnist_mlp``: 784 -> 64 -> 32 -> classes, 52,650 in all; at ``fc2`` the devices
hold 52,320 of them. No norm layers: perceptrons this small train well without them.
"""

from __future__ import annotations

from torch import nn

from models.base import ModelInfo, Stage

DIGITS_MLP = ModelInfo(
    name="digits_mlp",
    input_shape=(1, 8, 8),
    cuts=("fc1", "fc2"),
    default_cut="fc1",
    description="MLP 64-64-32 for 8x8 digits; client keeps one or two hidden layers",
)


def digits_mlp_stages(num_classes: int) -> list[Stage]:
    """Named stages of `digits_mlp`; the cut names are the first two."""
    return [
        ("fc1", nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU())),
        ("fc2", nn.Sequential(nn.Linear(64, 32), nn.ReLU())),
        ("head", nn.Linear(32, num_classes)),
    ]


FMNIST_MLP = ModelInfo(
    name="fmnist_mlp",
    input_shape=(1, 28, 28),
    cuts=("fc1", "fc2"),
    default_cut="fc2",
    description="MLP 784-64-32 for 28x28 Fashion-MNIST; by default the devices hold both layers",
)


def fmnist_mlp_stages(num_classes: int) -> list[Stage]:
    """Named stages of `fmnist_mlp`, as `digits_mlp`'s on a 784-pixel input."""
    return [
        ("fc1", nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU())),
        ("fc2", nn.Sequential(nn.Linear(64, 32), nn.ReLU())),
        ("head", nn.Linear(32, num_classes)),
    ]
