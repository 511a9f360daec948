"""Local checkpoints: a restored trainer carries on exactly as the one that saved them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edge_agent.checkpoint import CheckpointStore
from edge_agent.data import load_dataset
from edge_agent.errors import JobSpecError
from edge_agent.jobspec import JobSpec
from edge_agent.trainer import ClientTrainer
from edge_agent.weights import state_to_numpy
from models import build_split

JOB = {"model": "digits_mlp", "cut": "default", "num_classes": 10, "lr": 0.05, "momentum": 0.9,
       "weight_decay": 0.0, "seed": 3, "rank": 1, "rounds": 20}  # fmt: skip


def _trainer() -> ClientTrainer:
    ds = load_dataset("digits", None)
    torch.manual_seed(0)
    init = state_to_numpy(build_split("digits_mlp", "default", num_classes=10).client)
    shard = np.arange(0, 300, dtype=np.int64)
    return ClientTrainer(JOB, shard, init, ds.x_train, ds.y_train, ds.normalize, "cpu")


def _round(t: ClientTrainer, r: int) -> np.ndarray:
    acts, _, _ = t.forward(r, 16)
    t.backward(r, np.full_like(acts, 0.01))
    return acts


def test_a_restored_trainer_continues_bit_for_bit(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, "pi-01")
    a = _trainer()
    for r in range(1, 4):
        _round(a, r)
    store.save("run-1", 3, a.checkpoint())
    b = _trainer()  # a restarted device: fresh weights, optimizer and sampler
    state = store.load("run-1")
    assert state is not None and state["round"] == 3
    b.restore(state)
    assert b.applied_round == 3
    for r in range(4, 7):  # same batches, same momentum, same weights afterwards
        assert np.array_equal(_round(a, r), _round(b, r))
    for name, value in a.weights().items():
        assert np.array_equal(value, b.weights()[name])


def test_newest_kept_exact_round_and_bad_files(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, "../evil id", keep=2)
    t = _trainer()
    for r in (10, 20, 30):
        store.save("run-1", r, t.checkpoint())
    assert store.rounds("run-1") == [20, 30] and store.dir.parent == tmp_path
    assert CheckpointStore(tmp_path, "..").dir.parent == tmp_path  # an id is one folder
    assert store.load("run-1", 20)["round"] == 20  # type: ignore[index]
    assert store.load("run-1", 10) is None and store.load("other-run") is None
    store.save("run-1", 40, t.checkpoint())
    store.drop_after("run-1", 30)  # a run resumed from round 30 abandons round 40
    assert store.rounds("run-1") == [30]
    (store.dir / "run-1" / "round-30.pt").write_bytes(b"not a checkpoint")
    assert store.load("run-1") is None  # reported and skipped, never fatal


def test_a_spec_and_its_hand_written_map_build_the_same_trainer() -> None:
    ds = load_dataset("digits", None)
    torch.manual_seed(0)
    init = state_to_numpy(build_split("digits_mlp", "default", num_classes=10).client)
    shard = np.arange(0, 300, dtype=np.int64)
    spec = JobSpec.from_partial(JOB)
    a = ClientTrainer(spec, shard, init, ds.x_train, ds.y_train, ds.normalize, "cpu")
    b = _trainer()
    assert a.job == b.job == spec
    for r in range(1, 3):
        assert np.array_equal(_round(a, r), _round(b, r))
    with pytest.raises(JobSpecError, match=r"job\.bogus: unknown key"):
        ClientTrainer({**JOB, "bogus": 1}, shard, init, ds.x_train, ds.y_train, ds.normalize)
