"""A real orchestrator endpoint on port 0 for session tests, and the peer-side helpers they share.

``running()`` serves an :class:`Admission` over three sessions, wired as the engine wires it and
recording every event; the frame builders make schema-valid agent frames.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Callable, Optional

import numpy as np
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from edge_agent import protocol
from edge_agent.protocol import Message, decode, encode
from orchestrator.config.manifest import parse_manifest
from orchestrator.fleet.admission import Admission
from orchestrator.fleet.sessions import DeviceSession

SCALE = float(os.environ.get("GAPSL_TEST_TIMEOUT_SCALE", "1"))
WAIT_S = 10.0 * SCALE
RUN_ID = "fuzz-run"
MAX_BYTES = 16 * 1024  # small, so that an oversized frame costs nothing to send
TOKENS = {"good": "t-good", "fuzz": "t-fuzz", "spare": "t-spare"}
MANIFEST = "".join(f'[[devices]]\nid = "{d}"\ntoken = "{t}"\n' for d, t in TOKENS.items())
ERROR_CODES = {1002, 1003, 1007, 1008, 1009}

# What the orchestrator asked the fuzzed device for, before it connects (reply type -> values).
ASKED = {
    "activations": [3, 4],
    "client_grad": [4],
    "eval_result": [4],
    "echo_reply": [2],
    "bench_result": [3],
}
KEY = {"echo_reply": "seq", "bench_result": "seq"}  # the others answer by "round"

Event = tuple[str, Optional[str], dict]
JOB = encode("job", run_id=RUN_ID, job={}, shard=np.zeros(0, np.int64), weights={})


class Server:
    """An ``Admission`` over three sessions, wired as the engine wires it, recording everything."""

    def __init__(self) -> None:
        m = parse_manifest(MANIFEST)
        self.sessions = {d.id: DeviceSession(d, rank) for rank, d in enumerate(m.devices)}
        self.events: list[Event] = []
        self.crashes: list[BaseException] = []
        self.marker = asyncio.Event()  # a telemetry frame carrying "marker" got through
        self.admission = Admission(
            self.sessions, RUN_ID, lambda s: JOB, self._event, self._telemetry
        )
        self.url = ""

    def _event(self, event: str, device: str | None, fields: dict[str, Any]) -> None:
        self.events.append((event, device, dict(fields)))

    def _telemetry(self, session: DeviceSession) -> None:
        if "marker" in session.stats:
            self.marker.set()

    async def handler(self, ws: Any) -> None:
        try:
            await self.admission.handler(ws)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the property: the server never raises
            self.crashes.append(exc)
            raise

    def closes(self, device: str | None = None) -> list[dict[str, Any]]:
        """The fields of every refusal / bad-frame event (those carry the close code)."""
        return [
            f
            for e, d, f in self.events
            if e in ("refused", "bad_frame") and (device is None or d == device)
        ]


@asynccontextmanager
async def running() -> AsyncIterator[Server]:
    server = Server()
    async with serve(
        server.handler, "127.0.0.1", 0, compression=None, max_size=MAX_BYTES, close_timeout=5
    ) as ws_server:
        port = ws_server.sockets[0].getsockname()[1]
        server.url = f"ws://127.0.0.1:{port}"
        yield server
    assert not server.crashes, server.crashes


def run(scenario: Callable[[Server], Awaitable[None]]) -> None:
    """Run ``scenario`` against a fresh server, within the test's time bound."""

    async def main() -> None:
        async with running() as server:
            await within(scenario(server))

    asyncio.run(main())


def within(aw: Awaitable[Any]) -> Awaitable[Any]:
    return asyncio.wait_for(aw, WAIT_S)


def hello(
    device: str,
    token: str,
    rejoin: bool = False,
    version: int = 1,
    facts: dict[str, Any] | None = None,
) -> bytes:
    resume = {"run_id": RUN_ID, "round": 0} if rejoin else None
    return encode(
        "hello", protocol=version, device_id=device, token=token, facts=facts or {}, resume=resume
    )


def ready(torch_device: str = "cpu") -> bytes:
    return encode("ready", shard_size=10, load_s=0.01, torch_device=torch_device)


def reply(kind: str, value: int, batch: int = 2) -> bytes:
    """A schema-valid reply of ``kind`` answering request ``value`` (its round or seq)."""
    if kind == "activations":
        x = np.full((batch, 4), value, np.float32)
        return encode("activations", round=value, x=x, y=np.zeros(batch, np.int64), compute_s=0.0)
    if kind == "client_grad":
        return encode("client_grad", round=value, grad=np.ones(3, np.float32), compute_s=0.0)
    if kind == "eval_result":
        w = {"w": np.full(2, value, np.float32)}
        return encode("eval_result", round=value, weights=w, compute_s=0.0)
    if kind == "echo_reply":
        return encode("echo_reply", seq=value, payload=np.full(3, value % 256, np.uint8))
    if kind == "missed":
        return encode("missed", round=value)
    return encode("bench_result", seq=value, fwd_s=0.001, bwd_s=0.002)


async def recv(ws: Any) -> Message:
    return decode(await within(ws.recv()), protocol.ORCHESTRATOR_TYPES)


async def peer(
    server: Server, frames: Sequence[bytes | str], marker: bool = True
) -> tuple[int | None, str]:
    """Send ``frames`` as one connection; (None, "") if it is still open after a final marker
    telemetry got through, else the close code and reason the orchestrator chose."""
    async with connect(server.url, compression=None, max_size=None, open_timeout=WAIT_S) as ws:

        async def drain() -> None:  # job, requests, error frames: read them so nothing backs up
            try:
                async for _ in ws:
                    pass
            except ConnectionClosed:
                pass

        reader = asyncio.ensure_future(drain())
        marked = asyncio.ensure_future(server.marker.wait())
        try:
            try:
                for frame in frames:
                    await ws.send(frame)
                if marker:
                    await ws.send(encode("telemetry", stats={"marker": 1}))
            except ConnectionClosed:
                pass  # refused part-way: the close code tells why
            done, _ = await asyncio.wait(
                {reader, marked}, timeout=WAIT_S, return_when=asyncio.FIRST_COMPLETED
            )
            assert done, "the orchestrator neither closed the peer nor took its frames"
            if reader in done:
                return ws.close_code, ws.close_reason or ""
            return None, ""
        finally:
            marked.cancel()
            reader.cancel()
            await asyncio.gather(reader, marked, return_exceptions=True)


async def joined(server: Server, ws: Any, device: str = "fuzz") -> None:
    """Admit ``ws`` as ``device`` with a fresh job and answer it with ready."""
    await ws.send(hello(device, TOKENS[device]))
    assert (await recv(ws)).type == "job"
    await ws.send(ready())
    await within(server.sessions[device].ready.wait())
