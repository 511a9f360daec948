"""A device whose link drops mid-run redials and finishes the run; ``gapsl-agent doctor`` reports."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from orchestrator.config.manifest import manifest_to_toml, parse_manifest
from orchestrator.engine import Engine

ROOT = Path(__file__).resolve().parent.parent
SCALE = float(os.environ.get("GAPSL_TEST_TIMEOUT_SCALE", "1"))

MANIFEST = """
[testbed]
listen = "127.0.0.1:0"
[training]
rounds = 40
eval_every = 20
[[devices]]
id = "a"
token = "ta"
launch = "local"
device = "cpu"
[[devices]]
id = "b"
token = "tb"
launch = "local"
device = "cpu"
"""


def test_dropped_link_is_redialled_and_the_run_completes(tmp_path: Path) -> None:
    m = parse_manifest(MANIFEST)
    engine = Engine(m, tmp_path / "run", manifest_to_toml(m), run_id="reconnect")

    async def cut_link_once() -> None:
        session = engine.sessions["a"]
        while engine.state.round < 10:  # wait on the run's own progress, bounded below
            await asyncio.sleep(0.05)
        await session.ws.close(1011, "link cut by the test")

    async def scenario() -> str:
        async with asyncio.timeout(180 * SCALE):
            cutter = asyncio.create_task(cut_link_once())
            status = await engine.run()
            await cutter
            return status

    assert asyncio.run(scenario()) == "completed"
    events = [json.loads(x) for x in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    kinds = [(e["event"], e.get("device")) for e in events]
    assert ("lost", "a") in kinds and ("rejoined", "a") in kinds
    # the job was not sent again: "a" became ready once, and kept its partition's state
    assert kinds.count(("ready", "a")) == 1
    rounds = (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()
    assert len(rounds) == 40
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["final_acc_mean"] > 0.5


def test_doctor_checks_the_device() -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "edge_agent", "doctor", "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=120 * SCALE,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stdout + ok.stderr
    for check in ("python", "torch", "memory", "data", "orchestrator"):
        assert check in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "edge_agent", "doctor", "--orchestrator", "ws://127.0.0.1:9"],
        cwd=ROOT, capture_output=True, text=True, timeout=120 * SCALE,
    )  # fmt: skip
    assert bad.returncode == 1
    assert "does not answer" in bad.stdout
