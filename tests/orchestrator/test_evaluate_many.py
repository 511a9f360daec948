"""Scoring a whole fleet at once gives what scoring each device in turn gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_agent.data import load_dataset
from edge_agent.weights import load_numpy_state
from models import build_split
from orchestrator.training import evaluation
from orchestrator.training.evaluation import evaluate, evaluate_many


def _fleet(model: str, cut: str, n: int) -> tuple[object, list[dict[str, np.ndarray]]]:
    split = build_split(model, cut, num_classes=10)
    base = {k: v.numpy() for k, v in split.client.state_dict().items()}
    rng = np.random.default_rng(0)
    states = [
        {k: (v + 0.05 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in base.items()}
        for _ in range(n)
    ]
    return split, states


@pytest.mark.parametrize(("model", "cut"), [("digits_mlp", "fc1"), ("digits_cnn", "conv1")])
def test_equals_one_at_a_time(model: str, cut: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = load_dataset("digits")
    x, y = torch.from_numpy(ds.normalize(ds.x_test)), torch.from_numpy(ds.y_test)
    split, states = _fleet(model, cut, 7)
    # Several passes over the models and over the test set, so the chunking is exercised.
    monkeypatch.setattr(evaluation, "MANY_BYTES", 3 * 100 * 64 * 4)
    many = evaluate_many(split.client, split.server, states, x, y, batch_size=100)
    for w, (acc, loss) in zip(states, many):
        load_numpy_state(split.client, w)
        ref_acc, ref_loss = evaluate(split.client, split.server, x, y, batch_size=100)
        assert acc == ref_acc
        assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert len({round(a, 6) for a, _ in many}) > 1  # the devices really differ


def test_a_state_that_does_not_fit_is_refused() -> None:
    ds = load_dataset("digits")
    x, y = torch.from_numpy(ds.normalize(ds.x_test)), torch.from_numpy(ds.y_test)
    split, states = _fleet("digits_mlp", "fc1", 2)
    name = next(iter(states[1]))
    states[1][name] = states[1][name][:-1]
    with pytest.raises(RuntimeError, match=name):
        evaluate_many(split.client, split.server, states, x, y)
    del states[1][name]
    with pytest.raises(KeyError):
        evaluate_many(split.client, split.server, states, x, y)
