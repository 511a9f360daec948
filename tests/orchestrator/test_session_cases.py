"""The session rules one case at a time, over a real localhost WebSocket: replies nobody asked
for, frames out of state, late replies after a resend or a deadline, what ``joined`` events tell,
and sends to a peer that stopped reading. The property test is ``test_session_fuzz.py``."""

from __future__ import annotations

import asyncio

import pytest
from websockets.asyncio.client import connect

from edge_agent import protocol
from edge_agent.protocol import encode
from orchestrator.fleet.sessions import send_within

from .session_harness import (
    KEY,
    TOKENS,
    WAIT_S,
    Server,
    hello,
    joined,
    peer,
    ready,
    recv,
    reply,
    run,
    within,
)


def test_unsolicited_activations_close_1002_with_an_event() -> None:
    async def scenario(server: Server) -> None:
        frames = [hello("fuzz", TOKENS["fuzz"]), reply("activations", 5)]
        code, reason = await peer(server, frames, marker=False)
        assert code == protocol.CLOSE_PROTOCOL_ERROR
        assert "activations" in reason and "round=5" in reason
        assert [f["code"] for f in server.closes("fuzz")] == [protocol.CLOSE_PROTOCOL_ERROR]

    run(scenario)


@pytest.mark.parametrize(
    ("rejoin", "asked", "frames", "word"),
    [
        (False, [], [ready(), ready()], "ready"),  # a second ready for the same job
        (True, [], [ready()], "ready"),  # a rejoin of a ready device gets no job: no ready due
        (False, [("activations", 1)], [reply("eval_result", 1)], "eval_result"),  # wrong type
        (False, [("echo_reply", 2)], [reply("echo_reply", 2), reply("echo_reply", 3)], "seq=3"),
    ],
)
def test_frames_out_of_state_close_1002(
    rejoin: bool, asked: list[tuple[str, int]], frames: list[bytes], word: str
) -> None:
    async def scenario(server: Server) -> None:
        for kind, value in asked:
            server.sessions["fuzz"].expect(kind, KEY.get(kind, "round"), value)
        if rejoin:
            server.sessions["fuzz"].ready.set()  # it took the job on an earlier connection
        first = hello("fuzz", TOKENS["fuzz"], rejoin=rejoin)
        code, reason = await peer(server, [first, *frames], marker=False)
        assert code == protocol.CLOSE_PROTOCOL_ERROR and word in reason
        assert server.closes("fuzz")[-1]["reason"] == reason

    run(scenario)


def test_late_reply_after_a_resend_is_accepted_and_dropped() -> None:
    async def scenario(server: Server) -> None:
        s = server.sessions["fuzz"]
        request = encode("round", round=1, batch_size=2)
        async with connect(server.url, compression=None) as first:
            await joined(server, first)
            call = asyncio.ensure_future(s.call(request, "activations", 1, WAIT_S))
            assert (await recv(first))["round"] == 1  # asked, but the link "drops" unanswered
            async with connect(server.url, compression=None) as second:
                await second.send(hello("fuzz", TOKENS["fuzz"], rejoin=True))
                assert (await recv(second))["round"] == 1  # the same request, sent again
                await second.send(reply("activations", 1))
                await second.send(reply("activations", 1))  # the late answer to the first copy
                assert (await within(call))["round"] == 1
                # the next call skips the stale duplicate; the connection stays open
                call = asyncio.ensure_future(
                    s.call(encode("round", round=2, batch_size=2), "activations", 2, WAIT_S)
                )
                assert (await recv(second))["round"] == 2
                await second.send(reply("activations", 2))
                assert (await within(call))["round"] == 2
                assert second.close_code is None
            assert first.close_code == protocol.CLOSE_GOING_AWAY
        assert not server.closes("fuzz"), server.events

    run(scenario)


def test_late_reply_after_a_deadline_is_accepted_and_dropped() -> None:
    async def scenario(server: Server) -> None:
        s = server.sessions["fuzz"]
        async with connect(server.url, compression=None) as ws:
            await joined(server, ws)
            # Past a round's deadline the orchestrator cancels the call and moves on.
            call = asyncio.ensure_future(
                s.call(encode("round", round=3, batch_size=2), "activations", 3, WAIT_S)
            )
            assert (await recv(ws))["round"] == 3
            call.cancel()
            await asyncio.gather(call, return_exceptions=True)
            await ws.send(reply("activations", 3))  # after the orchestrator gave up on it
            call = asyncio.ensure_future(
                s.call(encode("eval_request", round=3), "eval_result", 3, WAIT_S)
            )
            assert (await recv(ws)).type == "eval_request"
            await ws.send(reply("eval_result", 3))
            assert (await within(call)).type == "eval_result"
            assert ws.close_code is None
        assert not server.closes("fuzz"), server.events

    run(scenario)


FACTS = {
    "hostname": "pi-03",
    "platform": "Linux aarch64",
    "torch_device": "",  # an agent learns its torch device with the job
    "cpu_count": 4,
    "memory_bytes": 8 << 30,
    "python": "3.11.7",  # sent, but not one of the facts the events carry
}


def test_joined_and_rejoined_events_carry_the_hello_facts() -> None:
    async def scenario(server: Server) -> None:
        async with connect(server.url, compression=None) as first:
            await first.send(hello("fuzz", TOKENS["fuzz"], facts=FACTS))
            assert (await recv(first)).type == "job"
            await first.send(ready(torch_device="cpu"))
            await within(server.sessions["fuzz"].ready.wait())
            facts = {**FACTS, "torch_device": "cpu", "cpu_count": True, "hostname": ["x"]}
            async with connect(server.url, compression=None) as second:
                await second.send(hello("fuzz", TOKENS["fuzz"], rejoin=True, facts=facts))
                # frames are handled in order: once this one is in, the hello has been judged
                await second.send(encode("telemetry", stats={"marker": 1}))
                await within(server.marker.wait())
        by_event = {e: f for e, d, f in server.events if d == "fuzz"}
        assert by_event["joined"] == {
            "peer": by_event["joined"]["peer"],
            "hostname": "pi-03",
            "platform": "Linux aarch64",
            "cpu_count": 4,
            "memory_bytes": 8 << 30,
        }
        assert by_event["ready"]["torch_device"] == "cpu"
        # facts of the wrong type (a bool count, a list for a name) are left out, not passed on
        rejoined = by_event["rejoined"]
        assert {k: rejoined[k] for k in rejoined if k != "peer"} == {
            "platform": "Linux aarch64",
            "torch_device": "cpu",
            "memory_bytes": 8 << 30,
        }

    run(scenario)


class _StuckPeer:
    """A connection whose peer stopped reading: sends and closes never finish by themselves."""

    def __init__(self) -> None:
        self.transport = self
        self.closed_with: tuple[int, str] | None = None
        self.aborted = False

    async def send(self, frame: bytes) -> None:
        await asyncio.Event().wait()

    async def close(self, code: int, reason: str) -> None:
        self.closed_with = (code, reason)
        await asyncio.Event().wait()  # the close frame queued behind unread data: drain waits

    def abort(self) -> None:
        self.aborted = True


def test_a_send_to_a_peer_that_stopped_reading_is_bounded_and_closes_it() -> None:
    async def scenario() -> None:
        ws = _StuckPeer()
        assert not await send_within(ws, b"frame", timeout_s=0.05, close_timeout_s=0.05)
        assert ws.closed_with == (protocol.CLOSE_GOING_AWAY, "not reading")
        assert ws.aborted  # the close itself could not finish: the connection was aborted

        session = Server().sessions["fuzz"]
        assert not await session.send(b"frame")  # no connection: nothing to wait on

    asyncio.run(asyncio.wait_for(scenario(), WAIT_S))
