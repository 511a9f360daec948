"""A device that goes silent is marked lost; rounds go on without it while enough remain.

The device is SIGSTOPped: its connection stays open but stops answering keepalive pings, so the
orchestrator closes it, waits ``testbed.patience_s`` for it to dial back, and then leaves it out.
With fewer devices than ``scheduler.min_participants`` the run waits visibly for
``testbed.lost_timeout_s`` and then fails, naming both keys. No deadline is set here: only the
patience can keep the run going. A local agent killed for good (``testbed.respawn_local = 0``,
nobody starting it again) is held to the very same rules: its exit alone does not end the run.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from orchestrator.config.manifest import local_device_toml, manifest_to_toml, parse_manifest
from orchestrator.engine import Engine

from .stall import run_with_stopped_agent

MANIFEST = """
[testbed]
listen = "127.0.0.1:0"
round_timeout_s = 600.0   # far beyond the test's own limit
ping_interval_s = 1.0
ping_timeout_s = 2.0
patience_s = 2.0
lost_timeout_s = 4.0
[training]
rounds = 30
eval_every = 10
"""
MANIFEST += "".join(local_device_toml(i, f"t-{i}") for i in ("a", "b", "c"))


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _run_with_c_stopped(tmp_path: Path, overrides: list[str], sig: int = signal.SIGSTOP) -> str:
    m = parse_manifest(MANIFEST, overrides=overrides)
    engine = Engine(m, tmp_path / "run", manifest_to_toml(m), run_id="lost")
    return run_with_stopped_agent(engine, "c", at_round=8, limit_s=240, sig=sig)


def test_lost_device_is_left_out_and_the_run_completes(tmp_path: Path) -> None:
    assert _run_with_c_stopped(tmp_path, []) == "completed"
    run = tmp_path / "run"
    rounds = _lines(run / "rounds.jsonl")
    assert len(rounds) == 30 and rounds[-1]["participants"] == ["a", "b"]
    assert rounds[5]["participants"] == ["a", "b", "c"]
    events = _lines(run / "events.jsonl")
    assert any(e["event"] == "lost" and e.get("device") == "c" for e in events)
    assert set(_lines(run / "metrics.jsonl")[-1]["acc"]) == {"a", "b"}


def test_too_few_devices_wait_visibly_then_fail_with_the_reason(tmp_path: Path) -> None:
    status = _run_with_c_stopped(tmp_path, ["scheduler.min_participants=3"])
    assert status == "failed"
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    reason = summary["error"]
    assert "min_participants" in reason and "lost_timeout_s" in reason and "c" in reason
    waits = [e for e in _lines(run / "events.jsonl") if e["event"] == "waiting" and "need" in e]
    assert waits and waits[0]["need"] == 3 and waits[0]["absent"] == "c"


@pytest.mark.parametrize(("need", "status"), [(1, "completed"), (3, "failed")])
def test_killed_agent_that_never_returns_is_a_lost_device(
    tmp_path: Path, need: int, status: str
) -> None:
    """Not started again (respawn_local = 0) and never back: the lost-device rules decide."""
    overrides = ["testbed.respawn_local=0", f"scheduler.min_participants={need}"]
    assert _run_with_c_stopped(tmp_path, overrides, signal.SIGKILL) == status
    run = tmp_path / "run"
    events = [e for e in _lines(run / "events.jsonl") if e.get("device") == "c"]
    kinds = [e["event"] for e in events]
    assert "awaiting_return" in kinds and "returned" not in kinds and "respawned" not in kinds
    summary = json.loads((run / "summary.json").read_text())
    if status == "completed":
        assert _lines(run / "rounds.jsonl")[-1]["participants"] == ["a", "b"]
    else:  # the reason is the quorum's, not the agent's exit code
        assert "lost_timeout_s" in summary["error"] and "exited" not in summary["error"]
