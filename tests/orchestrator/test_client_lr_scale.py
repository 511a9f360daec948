"""``training.client_lr_scale``: the devices' rate is ``lr * scale``; 0 freezes the client partitions.

Frozen partitions are the control of the accuracy study: every device keeps the identical
initial weights, so nothing drifts, while the server partition still learns.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from orchestrator.config.manifest import ManifestError, manifest_to_toml, parse_manifest
from orchestrator.engine import Engine
from orchestrator.training.job import job_spec, prepare_job

_TEXT = """
[testbed]
name = "client-lr"
listen = "127.0.0.1:0"
[training]
dataset = "digits"
rounds = 8
eval_every = 4
lr = 0.05
[data]
partition = "dirichlet"
alpha = 0.1
""" + "".join(f'[[devices]]\nid = "d{i}"\ntoken = "t"\ndevice = "cpu"\n' for i in range(3))


def _simulate(tmp_path: Path, scale: float) -> list[dict[str, float]]:
    m = parse_manifest(_TEXT, overrides=[f"training.client_lr_scale={scale}"])
    out = tmp_path / f"scale-{scale}"
    status = asyncio.run(
        Engine(m, out, manifest_to_toml(m), run_id=out.name, in_process=True).run()
    )
    assert status == "completed"
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_job_carries_the_scaled_rate() -> None:
    m = parse_manifest(_TEXT, overrides=["training.client_lr_scale=0.2"])
    job = prepare_job(m)
    assert job_spec(m, job, 0)["lr"] == pytest.approx(0.01)
    assert m.training.lr == 0.05  # the server keeps the manifest's rate


def test_a_zero_scale_freezes_every_client_partition(tmp_path: Path) -> None:
    frozen = _simulate(tmp_path, 0.0)
    trained = _simulate(tmp_path, 1.0)
    assert [r["client_spread"] for r in frozen] == [0.0, 0.0]
    assert all(r["client_spread"] > 0.01 for r in trained)
    # the server partition still learns on top of the frozen ones
    assert frozen[-1]["acc_mean"] > 0.3


def test_a_negative_scale_names_the_key() -> None:
    with pytest.raises(ManifestError, match="client_lr_scale"):
        parse_manifest(_TEXT, overrides=["training.client_lr_scale=-1"])
