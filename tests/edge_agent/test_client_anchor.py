"""``training.client_anchor``: each client partition is pulled towards the shared initial weights."""

from __future__ import annotations

import numpy as np
import torch

from edge_agent.data import load_dataset
from edge_agent.trainer import ClientTrainer
from edge_agent.weights import state_to_numpy
from models import build_split


def _distance_after(anchor: float, rounds: int = 30) -> float:
    ds = load_dataset("digits", None)
    torch.manual_seed(0)
    init = state_to_numpy(build_split("digits_mlp", "default", num_classes=10).client)
    job = {"model": "digits_mlp", "cut": "default", "num_classes": 10, "lr": 0.05,
           "momentum": 0.9, "weight_decay": 0.0, "seed": 0, "rank": 0, "rounds": rounds,
           "client_anchor": anchor}  # fmt: skip
    t = ClientTrainer(job, np.arange(200), init, ds.x_train, ds.y_train, ds.normalize, "cpu")
    rng = np.random.default_rng(0)
    for r in range(1, rounds + 1):
        acts, _, _ = t.forward(r, 16)
        t.backward(r, rng.normal(0, 0.05, acts.shape).astype(np.float32))  # the same gradients
    return float(sum(np.sum((w - init[k]) ** 2) for k, w in t.weights().items()) ** 0.5)


def test_the_anchor_keeps_the_partition_near_its_start() -> None:
    free, held = _distance_after(0.0), _distance_after(1.0)
    assert 0 < held < 0.8 * free
