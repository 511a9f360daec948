"""A real agent against a scripted orchestrator on localhost: a job map it cannot read is refused
as any job it cannot run is (``error`` ``job_failed`` naming the cause, close 1000, exit 1), and
every wait on the orchestrator is bounded (a silent one is redialled, a stalled send given up)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.server import ServerConnection, serve

from edge_agent.agent import Agent, AgentExit
from edge_agent.config import AgentConfig
from edge_agent.emulation import LinkShaper
from edge_agent.errors import LinkTimeout
from edge_agent.link import Link
from edge_agent.protocol import AGENT_TYPES, decode, encode

from .protocol_helpers import JOB_MAP as WIRE

SCALE = float(os.environ.get("GAPSL_TEST_TIMEOUT_SCALE", "1"))

Handler = Callable[[ServerConnection], Awaitable[None]]


async def _run_agent(handler: Handler, **cfg: Any) -> AgentExit:
    """Serve ``handler`` on a free port and run one agent against it until it exits."""
    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        config = AgentConfig(
            url=f"ws://127.0.0.1:{port}",
            device_id="pi-01",
            token="t",
            give_up_s=10 * SCALE,
            telemetry_every_s=3600.0,  # keep telemetry out of the scripted exchange
            **cfg,
        )
        async with asyncio.timeout(60 * SCALE):
            return await Agent(config).run()


def _job_answer(job: dict[str, Any]) -> tuple[AgentExit, list[Any]]:
    """Send ``job`` after the hello; return the agent's exit and what it sent back, then how it
    closed: ``[(type, fields), ..., ("closed", code, reason)]``."""
    seen: list[Any] = []

    async def handler(ws: ServerConnection) -> None:
        assert decode(await ws.recv(), AGENT_TYPES).type == "hello"
        shard = np.arange(8, dtype=np.int64)
        await ws.send(encode("job", run_id="r1", job=job, shard=shard, weights={}))
        async for frame in ws:
            msg = decode(frame, AGENT_TYPES)
            seen.append((msg.type, dict(msg.fields)))
        seen.append(("closed", ws.close_code, ws.close_reason))

    return asyncio.run(_run_agent(handler)), seen


@pytest.mark.parametrize(
    ("job", "named"),
    [
        ({**WIRE, "lr_schedule": "cosine"}, "job.lr_schedule: unknown key"),
        ({k: v for k, v in WIRE.items() if k != "seed"}, "job.seed: missing"),
        ({**WIRE, "rank": "2"}, "job.rank: expected int, got str"),
        # a job the agent could always read but not run: the answer the others must match
        ({**WIRE, "dataset_fingerprint": "ffffffffffffffff"}, "fingerprints disagree"),
    ],
    ids=["unknown key", "missing key", "mistyped key", "fingerprint mismatch"],
)
def test_a_job_the_agent_cannot_read_is_refused_like_one_it_cannot_run(
    job: dict[str, Any], named: str
) -> None:
    code, seen = _job_answer(job)
    assert code == AgentExit.FAILED
    assert [s[0] for s in seen] == ["error", "closed"]
    assert seen[0][1]["code"] == "job_failed" and named in seen[0][1]["message"]
    assert seen[1][1:] == (1000, "job failed")


def test_a_silent_orchestrator_is_redialled() -> None:
    closes: list[int | None] = []

    async def handler(ws: ServerConnection) -> None:
        assert decode(await ws.recv(), AGENT_TYPES).type == "hello"
        if not closes:  # first connection: say nothing, so that the agent gives up on it
            await ws.wait_closed()
            closes.append(ws.close_code)
            return
        await ws.send(encode("bye", reason="done"))
        await ws.wait_closed()
        closes.append(ws.close_code)

    code = asyncio.run(_run_agent(handler, idle_timeout_s=0.3 * SCALE))
    assert code == AgentExit.OK
    assert closes == [1001, 1000]  # going away from the silent link, then the normal bye


class _StuckSocket:
    """A connection whose send never completes, as on a link that stopped draining."""

    def __init__(self) -> None:
        self.closed_with: tuple[int, str] | None = None

    async def send(self, frame: bytes) -> None:
        await asyncio.Event().wait()

    async def close(self, code: int, reason: str) -> None:
        self.closed_with = (code, reason)


def test_a_send_that_does_not_complete_is_given_up() -> None:
    ws = _StuckSocket()
    cfg = AgentConfig(url="ws://unused", device_id="d", token="t", send_timeout_s=0.05)
    link = Link(ws, cfg, LinkShaper(0, 0), LinkShaper(0, 0))

    async def scenario() -> None:
        async with asyncio.timeout(10 * SCALE):
            with pytest.raises(LinkTimeout, match="not sent in 0.05 s"):
                await link.send(b"\x80")

    asyncio.run(scenario())
    assert isinstance(LinkTimeout("x"), TimeoutError)
