"""A model factory and a data loader of one's own, as docs/own-model-and-data.md describes:
the tests name them in manifests as ``tests.own_model_example:NAME``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

FEATURES, CLASSES = 12, 3


def blobs(data_dir: Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Three Gaussian blobs in 12 dimensions: float features, the same on every machine (the
    generator is seeded, so the fingerprints of the orchestrator and the devices agree)."""
    rng = np.random.default_rng(7)
    centres = rng.normal(0.0, 2.0, size=(CLASSES, FEATURES))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, CLASSES, size=n)
        return centres[y] + rng.normal(0.0, 1.0, size=(n, FEATURES)), y

    x_train, y_train = draw(240)
    x_test, y_test = draw(90)
    return x_train, y_train, x_test, y_test


def tiny_mlp(num_classes: int) -> list[tuple[str, nn.Module]]:
    """A 12-16-8 perceptron: cut after "hidden" (the default) or "bottleneck"."""
    return [
        ("hidden", nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU())),
        ("bottleneck", nn.Sequential(nn.Linear(16, 8), nn.ReLU())),
        ("head", nn.Linear(8, num_classes)),
    ]


def tiny_cnn(num_classes: int) -> nn.Sequential:
    """A small CNN for 1-channel images of any size, as an nn.Sequential of named stages;
    only "conv" may be the cut."""
    from collections import OrderedDict

    return nn.Sequential(
        OrderedDict(
            conv=nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()),
            pool=nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten()),
            head=nn.Linear(16, num_classes),
        )
    )


tiny_cnn.cuts = ("conv",)  # type: ignore[attr-defined]


def not_stages(num_classes: int) -> nn.Module:
    """A factory that returns one module instead of its stages."""
    return nn.Linear(4, num_classes)


def three_arrays(data_dir: Path | None) -> tuple[np.ndarray, ...]:
    """A loader that forgets the test labels."""
    x, y, x_test, _ = blobs(data_dir)
    return x, y, x_test


NOT_CALLABLE = 3
