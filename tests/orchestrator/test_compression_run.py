"""``training.compression`` end to end: the orchestrator's checks, the job, and simulate as the
oracle of a local fleet with int8 activations and gradients on the wire."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from edge_agent.compress import pack, roundtrip
from edge_agent.protocol import AGENT_TYPES, ORCHESTRATOR_TYPES, decode, encode
from orchestrator.config.manifest import manifest_to_toml
from orchestrator.engine import Engine
from orchestrator.errors import RunError
from orchestrator.fleet.group import _check_activations, _packed_grad
from orchestrator.training.job import job_spec

from .test_reference_equality import METRICS, SCALE, TOL, _jsonl, _manifest


def _activations(x: np.ndarray, scale: float | None, y: np.ndarray | None = None) -> object:
    y = np.arange(len(x), dtype=np.int64) % 10 if y is None else y
    frame = encode("activations", round=1, x=x, x_scale=scale, y=y, compute_s=0.0)
    return decode(frame, AGENT_TYPES)


def _acts() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)


@pytest.mark.parametrize("mode", ["none", "fp16", "int8"])
def test_the_orchestrator_unpacks_what_the_job_says(mode: str) -> None:
    x = _acts()
    msg = _activations(*pack(x, mode))
    got, labels = _check_activations("d0", msg, 4, 10, mode)  # type: ignore[arg-type]
    assert got.dtype == np.float32 and labels.dtype == np.int64
    np.testing.assert_array_equal(got, roundtrip(x, mode))


def test_activations_in_another_codec_fail_the_run_naming_the_device() -> None:
    x = _acts()
    for sent, expected in (("none", "int8"), ("fp16", "none"), ("int8", "fp16")):
        msg = _activations(*pack(x, sent))
        with pytest.raises(RunError, match=f"device d0: .*compression = '{expected}'"):
            _check_activations("d0", msg, 4, 10, expected)  # type: ignore[arg-type]
    msg = _activations(x.astype(np.int8), None)  # int8 without its scale
    with pytest.raises(RunError, match="device d0: .*scale"):
        _check_activations("d0", msg, 4, 10, "int8")  # type: ignore[arg-type]


def test_non_finite_float16_activations_are_refused() -> None:
    x = _acts().astype(np.float16)
    x[0, 0] = np.inf
    with pytest.raises(RunError, match="device d0: activations must be finite float16"):
        _check_activations("d0", _activations(x, None), 4, 10, "fp16")  # type: ignore[arg-type]
    bad = _acts()
    bad[1, 1] = np.nan
    with pytest.raises(RunError, match="must be finite float32"):  # the uncompressed check stands
        _check_activations("d0", _activations(bad, None), 4, 10)  # type: ignore[arg-type]


def test_gradients_go_down_packed_and_a_diverged_server_fails_the_run() -> None:
    g = _acts() / 100
    fields = _packed_grad("d1", 5, g, "int8")
    assert fields["grad"].dtype == np.int8 and fields["grad_scale"] > 0
    msg = decode(encode("gradients", round=5, loss=1.0, **fields), ORCHESTRATOR_TYPES)
    assert msg["grad"].dtype == np.int8
    fields = _packed_grad("d1", 5, g, "none")
    assert fields["grad"] is g and fields["grad_scale"] is None
    g[0, 0] = np.nan
    with pytest.raises(RunError, match="device d1: the gradient of round 5"):
        _packed_grad("d1", 5, g, "fp16")


def test_the_job_names_the_codec() -> None:
    m = _manifest(["training.compression=int8"])
    # job_spec reads only these of a prepared job; preparing one would cost seconds
    labels = np.arange(20, dtype=np.int64) % 10
    dataset = SimpleNamespace(num_classes=10, y_train=labels, fingerprint="f" * 16)
    job = SimpleNamespace(model="digits_mlp", cut="default", dataset=dataset)
    assert job_spec(m, job, 0)["compression"] == "int8"  # type: ignore[arg-type]
    m = _manifest([])
    assert job_spec(m, job, 0)["compression"] == "none"  # type: ignore[arg-type]


# --- runs ------------------------------------------------------------------------------------

CASE = ["training.algorithm=psl", "training.compression=int8"]


async def _both(root: Path) -> dict[str, str]:
    m = _manifest(CASE)
    statuses = {}
    for side, in_process in (("simulate", True), ("distributed", False)):
        engine = Engine(m, root / side, manifest_to_toml(m), run_id=side, in_process=in_process)
        statuses[side] = await asyncio.wait_for(engine.run(), 240 * SCALE)
    return statuses


@pytest.fixture(scope="module")
def int8_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("compression")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the reference-equality runs: agents get the cores
    try:
        statuses = asyncio.run(_both(root))
    finally:
        torch.set_num_threads(before)
    assert statuses == {"simulate": "completed", "distributed": "completed"}, statuses
    return root


def test_int8_simulate_reproduces_the_distributed_run(int8_runs: Path) -> None:
    ref = _jsonl(int8_runs / "simulate" / "metrics.jsonl")
    dist = _jsonl(int8_runs / "distributed" / "metrics.jsonl")
    assert [r["round"] for r in ref] == [r["round"] for r in dist] == [6, 12]
    for a, b in zip(ref, dist):
        assert max(abs(float(a[k]) - float(b[k])) for k in METRICS) <= TOL, (a, b)
        assert a["acc"] == pytest.approx(b["acc"], abs=TOL)
    losses = [
        [r["loss"] for r in _jsonl(int8_runs / side / "rounds.jsonl")]
        for side in ("simulate", "distributed")
    ]
    assert losses[0] == pytest.approx(losses[1], abs=TOL)
    assert ref[-1]["acc_mean"] > 0.5  # it learns through 8-bit activations and gradients


def test_compression_changes_the_numbers_only_when_on(tmp_path: Path) -> None:
    """simulate with int8 differs from the uncompressed run (the codec is applied), while
    compression = none stays the run it always was (same losses as an explicit none)."""

    def losses(overrides: list[str], name: str) -> list[float]:
        m = _manifest(overrides + ["training.rounds=4", "training.eval_every=4"])
        engine = Engine(m, tmp_path / name, manifest_to_toml(m), run_id=name, in_process=True)
        assert asyncio.run(engine.run()) == "completed"
        return [json.loads(x)["loss"] for x in (tmp_path / name / "rounds.jsonl").open()]

    plain = losses([], "default")
    assert losses(["training.compression=none"], "none") == plain
    packed = losses(["training.compression=int8"], "int8")
    # Round 1's loss already sees quantised activations: moved, but only a little.
    assert packed[0] != plain[0] and packed[0] == pytest.approx(plain[0], rel=0.02)


def test_the_bench_quick_run_ends_with_a_json_summary(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import compression

    assert compression.main(["--quick"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("| int8 |") for line in lines)  # the table comes first
    summary = json.loads(lines[-1])
    assert summary["quick"] is True
    assert 0.2 < summary["int8_bytes_ratio"] < 0.3 and 0.45 < summary["fp16_bytes_ratio"] < 0.55
    modes = summary["accuracy"]["digits"]["psl"]
    assert set(modes) == {"none", "fp16", "int8"}
