"""Restarts: an interrupted orchestrator resumes its run, a killed local agent comes back.

Both run the real command line (``python -m orchestrator``) with real agent processes. The
resumed run is compared with the in-process reference engine on the same manifest: devices
resume from their local checkpoints (partition, momentum, sampler position) and the server from
``checkpoint.pt``, so the metrics are expected to be the very same numbers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from orchestrator.config.manifest import local_device_toml

from .local_agents import agents_of

ROOT = Path(__file__).resolve().parent.parent
SCALE = float(os.environ.get("GAPSL_TEST_TIMEOUT_SCALE", "1"))

MANIFEST = """
[testbed]
name = "restart"
listen = "127.0.0.1:0"
join_timeout_s = 120.0
[training]
algorithm = "gapsl"
rounds = 40
eval_every = 10
seed = 1
[server]
device = "cpu"
[data]
partition = "dirichlet"
alpha = 0.5
"""
DEVICES = "".join(local_device_toml(f"d{i}", f"t{i}") for i in range(3))


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator", *args, "--no-dashboard"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _start(manifest: Path, run: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        _cli("run", str(manifest), "--run-dir", str(run)),
        cwd=manifest.parent,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _last_round(run: Path) -> int:
    rounds = _lines(run / "rounds.jsonl")
    return rounds[-1]["round"] if rounds else 0


def _wait_for(proc: subprocess.Popen[bytes], ok: Any, what: str, limit_s: float) -> None:
    end = time.monotonic() + limit_s * SCALE
    while not ok():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (code {proc.returncode}) before {what}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"no {what} within {limit_s * SCALE:.0f} s")
        time.sleep(0.1)


def _final(run: Path) -> dict[str, Any]:
    by_round = {rec["round"]: rec for rec in _lines(run / "metrics.jsonl")}
    return by_round[max(by_round)]


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    manifest = tmp_path / "testbed.toml"
    manifest.write_text(MANIFEST + DEVICES)
    run = tmp_path / "run"
    proc = _start(manifest, run)
    # Past the first checkpoint (round 10), so the stop checkpoint is a later one.
    _wait_for(proc, lambda: _last_round(run) >= 13, "round 13", 180)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120 * SCALE)
    assert proc.returncode == 130, err.decode()
    assert b"--resume" in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    stopped = summary["checkpoint_round"]
    assert 13 <= stopped < 40 and summary["rounds"] == stopped
    assert (run / "checkpoint.pt").exists()
    assert not any(p.status() != psutil.STATUS_ZOMBIE for p in agents_of(run)), "agents left over"

    done = subprocess.run(
        _cli("run", "--resume", str(run)),
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        timeout=300 * SCALE,
    )
    assert done.returncode == 0, done.stderr.decode()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 40
    events = _lines(run / "events.jsonl")
    assert any(e["event"] == "resumed" and e["round"] == stopped for e in events)
    restored = [e.get("restored_round") for e in events if e["event"] == "ready"][-3:]
    assert restored == [stopped] * 3  # every device resumed from its own checkpoint

    # The same manifest, never interrupted, in the reference engine.
    ref = tmp_path / "ref"
    simulated = subprocess.run(
        _cli("simulate", str(manifest), "--run-dir", str(ref)),
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        timeout=300 * SCALE,
    )
    assert simulated.returncode == 0, simulated.stderr.decode()
    resumed, uninterrupted = _final(run), _final(ref)
    assert resumed["round"] == uninterrupted["round"] == 40
    for key in ("acc_mean", "acc_min", "acc_max", "loss"):
        assert resumed[key] == pytest.approx(uninterrupted[key], abs=1e-6), key


def test_killed_agent_is_started_again_and_the_run_completes(tmp_path: Path) -> None:
    manifest = tmp_path / "testbed.toml"
    manifest.write_text(MANIFEST.replace("rounds = 40", "rounds = 60") + DEVICES)
    run = tmp_path / "run"
    proc = _start(manifest, run)
    _wait_for(proc, lambda: _last_round(run) >= 12, "round 12", 180)
    victim = next(p for p in agents_of(run) if "d1" in p.info["cmdline"])
    victim.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=300 * SCALE)
    assert proc.returncode == 0, err.decode()
    events = _lines(run / "events.jsonl")
    kinds = [(e["event"], e.get("device")) for e in events]
    assert ("respawned", "d1") in kinds
    back = [e for e in events if e["event"] == "ready" and e.get("device") == "d1"][-1]
    assert back.get("restored_round") in (10, 20)  # its newest checkpoint, not round 0
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
