"""The stability guard: an ``unstable`` event and a dashboard mark when a device's loss explodes
or its gradient runs away, and silence while training is merely noisy."""

from __future__ import annotations

import asyncio
import io
import json
import math
from pathlib import Path

from rich.console import Console

from orchestrator.config.manifest import manifest_to_toml, parse_manifest
from orchestrator.engine import Engine
from orchestrator.training.guard import QUIET_ROUNDS, WARMUP_ROUNDS, StabilityGuard
from orchestrator.ui.render import render
from orchestrator.ui.watch import snapshot_from_records

_TEXT = """
[testbed]
name = "guard"
listen = "127.0.0.1:0"
[training]
dataset = "digits"
model = "digits_mlp"
cut = "fc2"
rounds = 20
eval_every = 10
[data]
partition = "dirichlet"
alpha = 0.1
""" + "".join(f'[[devices]]\nid = "d{i}"\ntoken = "t"\ndevice = "cpu"\n' for i in range(3))


def _steady(guard: StabilityGuard, rounds: range) -> list[object]:
    return [e for r in rounds for e in guard.check(r, {"a": 1.0 + 0.1 * (r % 3)}, {"a": 2.0})]


def test_noise_is_quiet_and_an_explosion_is_named() -> None:
    guard = StabilityGuard(num_classes=10)
    assert _steady(guard, range(1, 30)) == []
    # 4x the mean but under twice a uniform guess's loss (2 ln 10 = 4.6): noise, not divergence
    assert guard.check(30, {"a": 4.5}, {"a": 2.0}) == []
    [(dev, fields)] = guard.check(31, {"a": 50.0}, {"a": 2.0})
    assert dev == "a" and fields["round"] == 31 and "loss" in str(fields["why"])
    # warned once, quiet for a while: one event per runaway, not one per round
    assert guard.check(32, {"a": 80.0}, {"a": 2.0}) == []
    assert guard.check(31 + QUIET_ROUNDS, {"a": 80.0}, {"a": 2.0}) != []


def test_a_runaway_gradient_and_a_non_finite_loss_are_named() -> None:
    guard = StabilityGuard(num_classes=10)
    _steady(guard, range(1, WARMUP_ROUNDS + 2))
    [(_, grad)] = guard.check(20, {"a": 1.0}, {"a": 50.0})
    assert "gradient norm" in str(grad["why"])
    fresh = StabilityGuard(num_classes=10)  # even before its warm-up
    [(_, nan)] = fresh.check(1, {"b": math.nan}, {"b": 1.0})
    assert "not finite" in str(nan["why"])


def _simulate(tmp_path: Path, lr: float) -> Path:
    m = parse_manifest(_TEXT, overrides=[f"training.lr={lr}"])
    out = tmp_path / f"lr-{lr}"
    engine = Engine(m, out, manifest_to_toml(m), run_id=out.name, in_process=True)
    assert asyncio.run(engine.run()) == "completed"
    return out


def _unstable(run: Path) -> list[dict[str, object]]:
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    return [e for e in events if e["event"] == "unstable"]


def test_a_diverging_run_is_marked_and_a_sound_one_is_not(tmp_path: Path) -> None:
    sound = _simulate(tmp_path, 0.05)
    assert _unstable(sound) == []
    diverging = _simulate(tmp_path, 3.0)  # far too large a step for this model
    warned = {e["device"] for e in _unstable(diverging)}
    assert warned, "no unstable event in a run whose loss explodes"
    snap = snapshot_from_records(diverging)
    assert {d.id for d in snap.devices if d.warning} == warned
    out = io.StringIO()
    Console(width=120, file=out, color_system=None).print(render(snap, 120, 40))
    assert "⚠" in out.getvalue() and "unstable" in out.getvalue()
    assert not any(d.warning for d in snapshot_from_records(sound).devices)
