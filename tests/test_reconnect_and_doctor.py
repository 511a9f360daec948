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


def test_doctor_loads_and_builds_a_dataset_and_model_of_one_s_own() -> None:
    from edge_agent.doctor import run_doctor

    own = "tests.own_model_example"
    lines: list[str] = []
    code = run_doctor(
        None, None, "cpu", lines.append, model=f"{own}:tiny_mlp", dataset=f"{own}:blobs"
    )
    assert code == 0, lines
    (data,) = [line for line in lines if " dataset " in line]
    assert data.startswith("[  ok]") and "3 classes, fingerprint" in data
    (model,) = [line for line in lines if " model " in line]
    assert model.startswith("[  ok]") and "cuts hidden, bottleneck" in model
    lines.clear()
    code = run_doctor(
        None, None, "cpu", lines.append, model="lab_absent.nets:tiny", dataset=f"{own}:nowhere"
    )
    assert code == 1
    failed = [line for line in lines if line.startswith("[FAIL]")]
    assert len(failed) == 2, lines
    assert "has no attribute 'nowhere'" in failed[0]
    assert "module 'lab_absent.nets' does not import" in failed[1] and "PYTHONPATH" in failed[1]
