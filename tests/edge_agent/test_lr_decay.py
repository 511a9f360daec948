"""``training.lr_decay``: one learning rate per round, the same on devices and server."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest

from edge_agent.schedule import round_lr
from orchestrator.config.manifest import manifest_to_toml, parse_manifest
from orchestrator.engine import Engine
from orchestrator.training import inprocess


def test_cosine_anneals_from_lr_towards_zero() -> None:
    assert round_lr(0.1, "none", 37, 50) == 0.1
    assert round_lr(0.1, "cosine", 1, 50) == pytest.approx(0.1)
    assert round_lr(0.1, "cosine", 26, 50) == pytest.approx(0.05)
    last = round_lr(0.1, "cosine", 50, 50)
    assert 0 < last < 0.1 * (1 - math.cos(math.pi / 50))  # one step above zero
    rates = [round_lr(0.1, "cosine", r, 50) for r in range(1, 51)]
    assert rates == sorted(rates, reverse=True)
    with pytest.raises(ValueError, match="lr_decay"):
        round_lr(0.1, "step", 1, 50)


def test_devices_and_server_step_with_the_round_rate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = """
[testbed]
listen = "127.0.0.1:0"
[training]
algorithm = "gapsl"
rounds = 8
eval_every = 8
lr_decay = "cosine"
[[devices]]
id = "a"
token = "t"
[[devices]]
id = "b"
token = "t"
"""
    m = parse_manifest(text)
    real = inprocess.InProcessGroup
    groups: list[Any] = []

    def keep(*args: Any, **kwargs: Any) -> Any:  # the engine's group, to read its trainers after
        groups.append(real(*args, **kwargs))
        return groups[-1]

    monkeypatch.setattr(inprocess, "InProcessGroup", keep)
    engine = Engine(m, tmp_path / "run", manifest_to_toml(m), run_id="decay", in_process=True)
    assert asyncio.run(engine.run()) == "completed"
    want = round_lr(m.training.lr, "cosine", 8, 8)
    assert engine.job is not None
    assert engine.job.optimizer.param_groups[0]["lr"] == pytest.approx(want)
    for trainer in groups[0].trainers.values():
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(want)
