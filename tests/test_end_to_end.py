"""End to end: the orchestrator CLI runs a local fleet of real agent processes over real WebSockets,
learns the digits, writes its run directory, and refuses misbehaving peers meanwhile."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from edge_agent import protocol
from edge_agent.protocol import encode

ROOT = Path(__file__).resolve().parent.parent
SCALE = float(os.environ.get("GAPSL_TEST_TIMEOUT_SCALE", "1"))

MANIFEST = """
[testbed]
name = "e2e"
listen = "127.0.0.1:0"
join_timeout_s = 120.0
max_message_bytes = 1048576

[training]
dataset = "digits"
rounds = 80
batch_size = 32
eval_every = 20
seed = 1

[data]
partition = "iid"

[[devices]]
id = "a"
token = "tok-a"
launch = "local"
device = "cpu"

[[devices]]
id = "b"
token = "tok-b"
launch = "local"
device = "cpu"

[[devices]]
id = "c"
token = "tok-c"
launch = "local"
device = "cpu"
"""


async def _close_code(url: str, *frames: bytes | str) -> int | None:
    """Send frames as a misbehaving peer would and return the close code the server chose."""
    async with connect(url, compression=None, max_size=None, open_timeout=10 * SCALE) as ws:
        try:
            for frame in frames:
                await ws.send(frame)
            async with asyncio.timeout(10 * SCALE):
                async for _ in ws:  # the server may send an error frame before closing
                    pass
        except ConnectionClosed:
            pass
        return ws.close_code


def _hello(device_id: str, token: str) -> bytes:
    return encode(
        "hello", protocol=protocol.PROTOCOL_VERSION, device_id=device_id, token=token, facts={}
    )


async def _read_until(stream: asyncio.StreamReader, pattern: str, seen: list[str]) -> re.Match[str]:
    while True:
        raw = await stream.readline()
        if not raw:
            raise AssertionError("orchestrator output ended early:\n" + "".join(seen[-30:]))
        line = raw.decode()
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match


async def _scenario(tmp_path: Path) -> tuple[int, dict[str, int | None], list[str]]:
    manifest = tmp_path / "testbed.toml"
    manifest.write_text(MANIFEST)
    run_dir = tmp_path / "run"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "orchestrator", "run", str(manifest), "--no-dashboard",
        "--run-dir", str(run_dir), "--set", "training.lr=0.05",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    assert proc.stdout is not None
    seen: list[str] = []
    codes: dict[str, int | None] = {}
    try:
        async with asyncio.timeout(240 * SCALE):
            url = (await _read_until(proc.stdout, r"url=(ws://[\d.]+:\d+)", seen)).group(1)
            # Misbehave while the run is training, not before it starts.
            await _read_until(proc.stdout, r"^eval round=20/", seen)
            codes["wrong_token"] = await _close_code(url, _hello("a", "not-the-token"))
            codes["unknown_device"] = await _close_code(url, _hello("intruder", "tok-a"))
            codes["undecodable"] = await _close_code(url, b"\xc1\x00garbage")
            codes["truncated"] = await _close_code(url, _hello("a", "tok-a")[:-3])
            codes["text_frame"] = await _close_code(url, "hello?")
            codes["oversized"] = await _close_code(url, b"\x00" * (2 * 1024 * 1024))
            codes["not_hello_first"] = await _close_code(url, encode("bye", reason="x"))
            while await proc.stdout.readline():
                pass
            rc = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return rc, codes, seen


def test_local_fleet_learns_and_refuses_bad_peers(tmp_path: Path) -> None:
    rc, codes, output = asyncio.run(_scenario(tmp_path))
    assert rc == 0, "".join(output[-30:])
    assert codes == {
        "wrong_token": protocol.CLOSE_POLICY_VIOLATION,
        "unknown_device": protocol.CLOSE_POLICY_VIOLATION,
        "undecodable": protocol.CLOSE_INVALID_PAYLOAD,
        "truncated": protocol.CLOSE_INVALID_PAYLOAD,
        "text_frame": protocol.CLOSE_UNSUPPORTED_DATA,
        "oversized": protocol.CLOSE_MESSAGE_TOO_BIG,
        "not_hello_first": protocol.CLOSE_PROTOCOL_ERROR,
    }
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["rounds"] == 80
    assert summary["algorithm"] == "psl" and summary["seed"] == 1
    # Ten classes: chance is 0.1. Every device's client∘server model must be far above it.
    assert summary["final_acc_mean"] >= 0.8
    assert summary["final_acc_min"] >= 0.7

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [20, 40, 60, 80]
    for m in metrics:
        assert {"round", "time_s", "acc_mean", "acc_min", "acc_max", "loss"} <= set(m)
        assert m["acc_min"] <= m["acc_mean"] <= m["acc_max"]
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == list(range(1, 81))
    assert set(rounds[0]["devices"]) == {"a", "b", "c"}
    assert all(r["devices"]["a"]["batch"] == 32 for r in rounds)

    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    refused = [e for e in events if e["event"] == "refused"]
    assert {e.get("device") for e in refused} >= {"a", "intruder"}
    assert all("tok-" not in json.dumps(e) and "not-the-token" not in json.dumps(e) for e in events)
    assert {e["device"] for e in events if e["event"] == "ready"} == {"a", "b", "c"}
    assert "[training]" in (run_dir / "manifest.toml").read_text()
    # every local agent left by itself after the run's bye
    assert sorted(e["code"] for e in events if e["event"] == "agent_exited") == [0, 0, 0]


def test_agent_with_wrong_token_exits_refused(tmp_path: Path) -> None:
    """A real agent process presenting a wrong token is told 1008 and exits with code 3."""

    async def scenario() -> int:
        from websockets.asyncio.server import serve

        from orchestrator.config.manifest import parse_manifest
        from orchestrator.fleet.admission import Admission
        from orchestrator.fleet.sessions import DeviceSession

        m = parse_manifest('[[devices]]\nid = "pi"\ntoken = "right"\n')
        sessions = {"pi": DeviceSession(m.devices[0], 0)}
        events: list[tuple[str, str | None]] = []
        admission = Admission(
            sessions, "run", lambda s: b"", lambda e, d, f: events.append((e, d)), lambda s: None
        )
        async with serve(admission.handler, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "edge_agent", "--orchestrator", f"ws://127.0.0.1:{port}",
                "--id", "pi", "--token", "wrong", "--give-up-s", "20", cwd=ROOT,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            async with asyncio.timeout(60 * SCALE):
                rc = await proc.wait()
        assert ("refused", "pi") in events
        return rc

    assert asyncio.run(scenario()) == 3
