"""A device whose agent dies comes back from whatever starts it again, and the run goes on.

With ``testbed.respawn_local = 0`` the orchestrator does not start a killed local agent again:
the device is then lost like a remote one and gets ``testbed.patience_s`` to return. Here it is
started again by hand with the very command line the orchestrator used (a lab script's way),
and a remote device's agent is restarted by a supervisor loop (systemd's ``Restart=always``).
Both resume from their own checkpoints and the runs complete.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from orchestrator.config.manifest import local_device_toml, manifest_to_toml, parse_manifest
from orchestrator.engine import Engine

ROOT = Path(__file__).resolve().parent.parent
SCALE = float(os.environ.get("GAPSL_TEST_TIMEOUT_SCALE", "1"))

MANIFEST = """
[testbed]
listen = "127.0.0.1:0"
respawn_local = 0
patience_s = 60.0   # far more than an agent needs to start again
[training]
rounds = 30
eval_every = 10
"""
KILL_AT = 12  # past the checkpoint of round 10


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


async def _round(engine: Engine, r: int) -> None:
    while engine.state.round < r:  # the run's own progress, bounded by the caller's timeout
        await asyncio.sleep(0.05)


def _story(run: Path, device: str) -> list[dict[str, Any]]:
    """What the event log says of ``device`` after the kill, its returned event last."""
    events = [e for e in _lines(run / "events.jsonl") if e.get("device") == device]
    kinds = [e["event"] for e in events]
    assert "respawned" not in kinds
    assert "returned" in kinds, kinds
    return events


def test_local_agent_started_again_by_hand_is_readmitted(tmp_path: Path) -> None:
    m = parse_manifest(MANIFEST + "".join(local_device_toml(i, f"t-{i}") for i in "abc"))
    run = tmp_path / "run"
    engine = Engine(m, run, manifest_to_toml(m), run_id="by-hand")
    log = open(tmp_path / "c-by-hand.log", "wb")

    async def kill_and_restart() -> asyncio.subprocess.Process:
        await _round(engine, KILL_AT)
        assert engine.fleet is not None
        proc = engine.fleet.procs["c"]
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        # The command line and environment the orchestrator started it with, as a lab script
        # that started it would know them; not a child of the orchestrator this time.
        cmd, env = engine.fleet.command("c"), engine.fleet.env
        return await asyncio.create_subprocess_exec(*cmd, env=env, stdout=log, stderr=log)

    async def scenario() -> tuple[str, int | None]:
        async with asyncio.timeout(240 * SCALE):
            restarter = asyncio.create_task(kill_and_restart())
            try:
                status = await engine.run()
            finally:
                restarter.cancel()
            again = restarter.result()
            try:
                async with asyncio.timeout(30 * SCALE):  # told bye, it leaves by itself
                    code = await again.wait()
            except TimeoutError:
                again.kill()
                code = None
            return status, code

    status, code = asyncio.run(scenario())
    log.close()
    assert status == "completed", (tmp_path / "c-by-hand.log").read_text()[-2000:]
    assert code == 0
    events = _story(run, "c")
    kinds = [e["event"] for e in events]
    exited = next(e for e in events if e["event"] == "agent_exited")
    assert exited["code"] == -signal.SIGKILL
    assert kinds.index("agent_exited") < kinds.index("awaiting_return") < kinds.index("returned")
    back = next(e for e in events if e["event"] == "returned")
    assert back["restored_round"] == 10  # from its own checkpoint, not from round 0
    assert back["away_s"] < m.testbed.patience_s
    print(f"local agent back {back['away_s']:.1f} s after its link dropped")
    rounds = _lines(run / "rounds.jsonl")
    assert len(rounds) == 30 and "c" in rounds[-1]["participants"]
    assert "c" in _lines(run / "metrics.jsonl")[-1]["acc"]


REMOTE = """
[[devices]]
id = "r"
token = "remote-secret"
device = "cpu"
"""


def test_remote_agent_under_a_supervisor_survives_a_kill(tmp_path: Path) -> None:
    text = MANIFEST + "".join(local_device_toml(i, f"t-{i}") for i in "ab") + REMOTE
    m = parse_manifest(text)
    run = tmp_path / "run"
    engine = Engine(m, run, manifest_to_toml(m), run_id="supervised")
    listening = asyncio.Event()
    url: list[str] = []
    exits: list[int] = []
    over = asyncio.Event()
    log = open(tmp_path / "r.log", "ab")
    agent: list[asyncio.subprocess.Process] = []

    def on_listening(addr: str) -> None:
        url.append(f"ws://{addr}")
        listening.set()

    async def supervise() -> None:
        """Restart the agent whenever it exits, as systemd's Restart=always does."""
        await listening.wait()
        cmd = [sys.executable, "-m", "edge_agent", "--orchestrator", url[0], "--id", "r"]
        cmd += ["--device", "cpu", "--threads", "1", "--give-up-s", "60"]
        cmd += ["--checkpoint-dir", str(tmp_path / "r-state")]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "GAPSL_TOKEN": "remote-secret"}
        env["OMP_NUM_THREADS"] = "1"
        while not over.is_set():
            proc = await asyncio.create_subprocess_exec(*cmd, env=env, stdout=log, stderr=log)
            agent[:] = [proc]
            exits.append(await proc.wait())
            await asyncio.sleep(0.5)  # RestartSec

    async def kill() -> None:
        await _round(engine, KILL_AT)
        agent[0].send_signal(signal.SIGKILL)

    async def scenario() -> str:
        async with asyncio.timeout(240 * SCALE):
            supervisor = asyncio.create_task(supervise())
            killer = asyncio.create_task(kill())
            try:
                return await engine.run(on_listening)
            finally:
                over.set()
                killer.cancel()
                try:
                    async with asyncio.timeout(30 * SCALE):  # told bye, it leaves by itself
                        await supervisor
                finally:
                    supervisor.cancel()
                    for p in agent:
                        if p.returncode is None:
                            p.kill()

    status = asyncio.run(scenario())
    log.close()
    assert status == "completed", (tmp_path / "r.log").read_text()[-2000:]
    assert exits[0] == -signal.SIGKILL and exits[-1] == 0
    events = _story(run, "r")
    back = next(e for e in events if e["event"] == "returned")
    assert back["restored_round"] == 10
    print(f"supervised remote agent back {back['away_s']:.1f} s after its link dropped")
    rounds = _lines(run / "rounds.jsonl")
    assert len(rounds) == 30 and "r" in rounds[-1]["participants"]
