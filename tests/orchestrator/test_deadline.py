"""With a deadline, a device that stalls (SIGSTOPped mid-run) does not stall the run."""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.config.manifest import local_device_toml, manifest_to_toml, parse_manifest
from orchestrator.engine import Engine

from .stall import run_with_stopped_agent

MANIFEST = """
[testbed]
listen = "127.0.0.1:0"
round_timeout_s = 600.0   # far beyond the test's own limit: only the deadline can save the run
[training]
rounds = 30
eval_every = 10
[scheduler]
deadline_factor = 3.0
min_participants = 2
"""
MANIFEST += "".join(local_device_toml(i, f"t-{i}") for i in ("a", "b", "c"))


def test_stalled_device_is_left_out_and_the_run_completes(tmp_path: Path) -> None:
    m = parse_manifest(MANIFEST)
    engine = Engine(m, tmp_path / "run", manifest_to_toml(m), run_id="stall")

    assert run_with_stopped_agent(engine, "c", at_round=8, limit_s=240) == "completed"
    run = tmp_path / "run"
    rounds = [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]
    assert len(rounds) == 30
    assert rounds[-1]["participants"] == ["a", "b"]
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "straggler" and e.get("device") == "c" for e in events)
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert set(metrics[-1]["acc"]) == {"a", "b"}  # the stalled device could not be evaluated
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
