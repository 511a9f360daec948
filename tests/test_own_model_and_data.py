"""A model and a loader of one's own (tests/own_model_example.py) train end to end: on a local
fleet of real agent processes, which import the example module themselves, and in-process
(``simulate``), with the same metrics from both; a folder dataset of uint8 images trains too."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from orchestrator.config.manifest import (
    Manifest,
    local_device_toml,
    manifest_to_toml,
    parse_manifest,
)
from orchestrator.engine import Engine
from orchestrator.training.job import build_job_spec, prepare_job

SCALE = float(os.environ.get("GAPSL_TEST_TIMEOUT_SCALE", "1"))
TOL = 1e-6  # as tests/orchestrator/test_reference_equality.py: measured differences are 0.0
OWN = "tests.own_model_example"
_DEVICES = "".join("\n" + local_device_toml(f"dev{i}", f"tok-{i}") for i in range(2))


def _manifest(dataset: str, model: str, base: Path, cut: str = "default") -> Manifest:
    text = f"""
[testbed]
name = "own"
listen = "127.0.0.1:0"
join_timeout_s = {120.0 * SCALE}
round_timeout_s = {60.0 * SCALE}

[training]
dataset = "{dataset}"
model = "{model}"
cut = "{cut}"
rounds = 8
eval_every = 4
lr = 0.1
seed = 1

[server]
device = "cpu"

[data]
partition = "dirichlet"
alpha = 1.0
{_DEVICES}"""
    return parse_manifest(text, source=str(base / "own.toml"), base_dir=base)


def _run(m: Manifest, run_dir: Path, in_process: bool) -> str:
    engine = Engine(m, run_dir, manifest_to_toml(m), run_id=run_dir.name, in_process=in_process)
    return asyncio.run(asyncio.wait_for(engine.run(None), timeout=180 * SCALE))


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def test_a_local_fleet_and_simulate_train_the_same_on_a_factory_and_a_loader(
    tmp_path: Path,
) -> None:
    m = _manifest(f"{OWN}:blobs", f"{OWN}:tiny_mlp", tmp_path, cut="bottleneck")
    assert _run(m, tmp_path / "simulate", True) == "completed"
    assert _run(m, tmp_path / "distributed", False) == "completed"
    ref = _jsonl(tmp_path / "simulate" / "metrics.jsonl")
    dist = _jsonl(tmp_path / "distributed" / "metrics.jsonl")
    assert [r["round"] for r in ref] == [r["round"] for r in dist] == [4, 8]
    for a, b in zip(ref, dist):
        for key in ("acc_mean", "acc_min", "acc_max", "loss"):
            assert abs(a[key] - b[key]) <= TOL, (a["round"], key, a[key], b[key])
        assert a["acc"] == pytest.approx(b["acc"], abs=TOL)
    losses = [
        [r["loss"] for r in _jsonl(tmp_path / s / "rounds.jsonl")]
        for s in ("simulate", "distributed")
    ]
    assert losses[0] == pytest.approx(losses[1], abs=TOL)
    assert ref[-1]["acc_mean"] > 0.5  # three classes: chance is a third


def _images(folder: Path, rng: np.random.Generator) -> None:
    """uint8 images, 1 x 6 x 6, saved N x H x W; class k is bright in its own rows."""
    folder.mkdir()
    for split, n in (("train", 160), ("test", 60)):
        y = rng.integers(0, 4, size=n).astype(np.uint8)
        x = rng.integers(0, 60, size=(n, 6, 6)).astype(np.uint8)
        for k in range(4):
            x[y == k, k, :] += 180
        np.savez_compressed(folder / f"{split}.npz", x=x, y=y)


def test_simulate_trains_a_folder_of_images_of_one_s_own(tmp_path: Path) -> None:
    _images(tmp_path / "my-images", np.random.default_rng(3))
    m = _manifest("my-images", f"{OWN}:tiny_cnn", tmp_path)  # relative to the manifest
    spec = build_job_spec(m, prepare_job(m), 0)
    assert spec.dataset == str(tmp_path / "my-images") and spec.num_classes == 4
    assert spec.cut == "conv"
    # the run directory's copy of the manifest still finds the folder (run --resume reads it)
    stored = parse_manifest(manifest_to_toml(m, absolute_paths=True), base_dir=tmp_path / "x")
    assert stored.dataset_spec() == spec.dataset
    assert _run(m, tmp_path / "run", True) == "completed"
    metrics = _jsonl(tmp_path / "run" / "metrics.jsonl")
    assert metrics[-1]["acc_mean"] > 0.5  # four classes: chance is a quarter
