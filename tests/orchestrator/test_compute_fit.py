"""The compute model is affine: a fixed cost per step plus a cost per sample, fitted from the
probe's two batch sizes and refined from the rounds; an emulated device's fit finds what its
emulation imposes."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from orchestrator.config.manifest import local_device_toml, manifest_to_toml, parse_manifest
from orchestrator.engine import Engine
from orchestrator.training.latency import AffineFit, DeviceProfile, predict_round
from orchestrator.training.scheduler import balance_batches

SCALE = float(os.environ.get("GAPSL_TEST_TIMEOUT_SCALE", "1"))
SLOWDOWN = 3.0
FIXED_MS = 40.0  # per compute step: a round's forward and backward add twice this


def test_the_probe_points_give_both_costs() -> None:
    fit = AffineFit.from_points([(8, 0.010 + 8 * 0.001), (64, 0.010 + 64 * 0.001)])
    assert fit.fixed_s == pytest.approx(0.010) and fit.per_sample_s == pytest.approx(0.001)
    assert fit.at(32) == pytest.approx(0.042)


def test_rounds_at_one_batch_move_the_fixed_cost_and_keep_the_slope() -> None:
    fit = AffineFit.from_points([(8, 0.018), (64, 0.074)])  # 10 ms + 1 ms per sample
    for _ in range(40):
        fit.observe(32, 0.060)  # the rounds cost 18 ms more than the probe said
    assert fit.per_sample_s == pytest.approx(0.001)
    assert fit.fixed_s == pytest.approx(0.028)
    assert fit.at(32) == pytest.approx(0.060)


def test_rounds_that_span_batch_sizes_move_the_slope_too() -> None:
    fit = AffineFit.from_points([(8, 0.018), (64, 0.074)])
    for k in range(200):
        b = 8 if k % 2 else 64
        fit.observe(b, 0.010 + 0.002 * b)  # twice the probe's cost per sample
    assert 0.0013 < fit.per_sample_s <= 0.002 + 1e-9
    assert fit.per_sample_s > 0.0013 and fit.fixed_s >= 0.0


def test_the_fit_never_goes_negative() -> None:
    fit = AffineFit.from_points([(8, 0.020), (64, 0.010)])  # noise: larger batch timed faster
    assert fit.per_sample_s == 0.0 and fit.fixed_s > 0
    fit = AffineFit.from_points([(8, 0.001), (64, 0.100)])
    assert fit.fixed_s == 0.0 and fit.per_sample_s > 0


def test_balanced_batches_account_for_fixed_costs() -> None:
    # Same cost per sample; b pays 60 ms per round before any sample: it gets the smaller batch,
    # and the predicted paths come out equal where a per-sample model would split evenly.
    a = DeviceProfile.from_bench([(1, 0.001), (8, 0.008)], [(1, 0.001), (8, 0.008)])
    b = DeviceProfile.from_bench([(1, 0.031), (8, 0.038)], [(1, 0.031), (8, 0.038)])
    batch = balance_batches({"a": a, "b": b}, 128, 0.0)
    assert batch["a"] > batch["b"] and sum(batch.values()) == 128
    pred = predict_round({"a": a, "b": b}, batch, 0.0, 0.0)
    assert abs(pred.device_s["a"] - pred.device_s["b"]) <= 0.002 + 1e-9
    assert b.record()["compute_fixed_ms"] == pytest.approx(60.0)


def _run(run_dir: Path) -> dict[str, dict[str, dict]]:
    text = (
        '[testbed]\nlisten = "127.0.0.1:0"\n[training]\nrounds = 12\neval_every = 6\n'
        # a batch large enough that the per-sample part is well above the timer's noise
        + "batch_size = 256\n"
        + local_device_toml("base", "t-base")
        + local_device_toml(
            "pinned", "t-pinned", compute_slowdown=SLOWDOWN, compute_fixed_ms=FIXED_MS
        )
    )
    m = parse_manifest(text)
    engine = Engine(m, run_dir, manifest_to_toml(m), run_id="fit")

    async def run() -> str:
        async with asyncio.timeout(240 * SCALE):
            return await engine.run()

    assert asyncio.run(run()) == "completed"
    out: dict[str, dict[str, dict]] = {"probe": {}, "fit": {}}
    for rec in map(json.loads, (run_dir / "devices.jsonl").read_text().splitlines()):
        if rec.get("source") in out:
            out[rec["source"]][rec["device"]] = rec  # the last of each
    return out


def _misses(got: dict[str, dict]) -> list[str]:
    """Where the emulated device's figures are off what its emulation adds to the base's."""
    base, dev = got["base"], got["pinned"]
    want_fixed = 2 * FIXED_MS  # a round's forward and backward each pay it
    extra_fixed = dev["compute_fixed_ms"] - SLOWDOWN * base["compute_fixed_ms"]
    ratio = dev["compute_ms_per_sample"] / max(base["compute_ms_per_sample"], 1e-9)
    bad = []
    if not 0.7 * want_fixed <= extra_fixed <= 1.5 * want_fixed:
        bad.append(f"fixed: {extra_fixed:.1f} ms beyond {SLOWDOWN} x base, emulated {want_fixed}")
    if not SLOWDOWN / 2.5 <= ratio <= SLOWDOWN * 2.5:
        bad.append(f"per-sample ratio {ratio:.2f}, emulated {SLOWDOWN}")
    return bad


def test_an_emulated_devices_fit_finds_its_fixed_and_per_sample_costs(tmp_path: Path) -> None:
    # Ratios to an unemulated device on the same machine, with wide bounds: the fixed cost is a
    # sleep the emulation adds, so it dominates the measurement whatever the machine's load.
    misses: list[list[str]] = []
    for attempt in range(2):
        got = _run(tmp_path / f"run{attempt}")
        misses.append([f"probe {m}" for m in _misses(got["probe"])])
        misses[-1] += [f"after the rounds {m}" for m in _misses(got["fit"])]
        if not misses[-1]:
            break
    assert not misses[-1], misses
