"""The session state machine under fire: every agent frame is checked against what its session
asked for. A fuzzing peer sends schema-valid messages in any order over a real localhost
WebSocket while a well-behaved device on the same orchestrator completes its exchanges."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Callable, Optional

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from edge_agent import protocol
from edge_agent.protocol import Message, ProtocolError, decode, encode
from orchestrator.config.manifest import parse_manifest
from orchestrator.fleet.sessions import REPLY_TYPES, Admission, DeviceSession

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


# --- a real orchestrator endpoint on port 0 --------------------------------------------------


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


def within(aw: Awaitable[Any]) -> Awaitable[Any]:
    return asyncio.wait_for(aw, WAIT_S)


def hello(device: str, token: str, rejoin: bool = False, version: int = 1) -> bytes:
    resume = {"run_id": RUN_ID, "round": 0} if rejoin else None
    return encode("hello", protocol=version, device_id=device, token=token, facts={}, resume=resume)


def ready() -> bytes:
    return encode("ready", shard_size=10, load_s=0.01, torch_device="cpu")


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


# --- the well-behaved device and the calls that drive it --------------------------------------


async def good_device(url: str, address: list[str]) -> None:
    """Answers every request like the reference agent, until the orchestrator says bye;
    ``address`` receives its "host:port", as the orchestrator's events name the peer."""
    async with connect(url, compression=None, max_size=None, open_timeout=WAIT_S) as ws:
        host, port = ws.local_address[:2]
        address.append(f"{host}:{port}")
        await ws.send(hello("good", TOKENS["good"]))
        while True:
            msg = await recv(ws)
            if msg.type == "job":
                await ws.send(ready())
                await ws.send(encode("telemetry", stats={"cpu_percent": 1.0}))
            elif msg.type == "round":
                await ws.send(reply("activations", msg["round"], msg["batch_size"]))
            elif msg.type == "eval_request":
                await ws.send(reply("eval_result", msg["round"]))
            elif msg.type == "echo":
                await ws.send(encode("echo_reply", seq=msg["seq"], payload=msg["payload"]))
            elif msg.type == "bench":
                await ws.send(reply("bench_result", msg["seq"]))
            elif msg.type == "bye":
                await ws.close(protocol.CLOSE_NORMAL, "bye")
                return


async def drive_good(server: Server) -> int:
    """Request/reply exchanges through ``DeviceSession.call``; returns how many were checked."""
    s = server.sessions["good"]
    await within(s.ready.wait())
    checked = 0
    for r in range(1, 4):
        payload = np.arange(r * 5, dtype=np.uint8)
        msg = await s.call(encode("echo", seq=r, payload=payload), "echo_reply", r, WAIT_S, "seq")
        assert msg["seq"] == r and np.array_equal(msg["payload"], payload)
        msg = await s.call(encode("round", round=r, batch_size=r + 1), "activations", r, WAIT_S)
        assert msg["round"] == r and msg["x"].shape == (r + 1, 4) and (msg["x"] == r).all()
        checked += 2
    msg = await s.call(encode("eval_request", round=3), "eval_result", 3, WAIT_S)
    assert msg["round"] == 3 and (msg["weights"]["w"] == 3).all()
    msg = await s.call(
        encode("bench", seq=9, batch_size=2, repeats=1), "bench_result", 9, WAIT_S, "seq"
    )
    assert msg["seq"] == 9
    await s.send(encode("bye", reason="completed"))
    return checked + 2


# --- the fuzzing peer: operations, frames and what the orchestrator must do ---------------------

Op = tuple[str, Any]
HELLOS = {  # name -> device_id, token, rejoin, protocol version
    "ok": ("fuzz", "t-fuzz", False, 1),
    "rejoin": ("fuzz", "t-fuzz", True, 1),
    "bad_token": ("fuzz", "not-the-token", False, 1),
    "unknown": ("intruder", "t-fuzz", False, 1),
    "good_bad_token": ("good", "t-fuzz", False, 1),  # must not disturb the good device
    "old_protocol": ("fuzz", "t-fuzz", False, 0),
}


def _undecodable(data: bytes) -> bool:
    try:
        decode(data, protocol.AGENT_TYPES)
    except ProtocolError:
        return True
    return False


def frame_of(op: Op) -> bytes | str:
    kind, arg = op
    if kind == "hello":
        return hello(*HELLOS[arg])
    fixed: dict[str, bytes | str] = {
        "ready": ready(),
        "telemetry": encode("telemetry", stats={"cpu_percent": 3.5}),
        "bye": encode("bye", reason="fuzz"),
        "error": encode("error", code="job_failed", message="fuzz"),
        "text": "hello?",
        "oversized": b"\x00" * (MAX_BYTES + 1),
    }
    return reply(*arg) if kind == "reply" else arg if kind == "junk" else fixed[kind]


def predict(ops: list[Op], was_ready: bool) -> tuple[int | None, str, int]:
    """The model: (None, "", len(ops)) if every frame is acceptable in its state, else the close
    code, a word the reason must contain, and the index of the offending frame. It restates the
    rules of docs/protocol.md; ``was_ready``: the device took this run's job on an earlier link."""
    admitted = awaiting_ready = False
    for at, (kind, arg) in enumerate(ops):
        code, word = _judge(kind, arg, admitted, awaiting_ready)
        if code is not None:
            return code, word, at
        if kind == "hello":
            # Only a rejoin of a device that is ready for this run skips the job (and its ready).
            admitted, awaiting_ready = True, not (arg == "rejoin" and was_ready)
        elif kind == "ready":
            awaiting_ready = False
    return None, "", len(ops)


def _judge(kind: str, arg: Any, admitted: bool, awaiting_ready: bool) -> tuple[int | None, str]:
    """The close code (and a word of its reason) one frame earns in a state, or (None, "")."""
    if kind == "junk":
        try:
            decode(arg, protocol.AGENT_TYPES)
        except ProtocolError as exc:
            return exc.code, ""
    if kind == "text":
        return protocol.CLOSE_UNSUPPORTED_DATA, ""
    if kind == "oversized":
        return protocol.CLOSE_MESSAGE_TOO_BIG, ""
    if not admitted:
        if kind != "hello":
            return protocol.CLOSE_PROTOCOL_ERROR, "hello"
        if arg in ("bad_token", "unknown", "good_bad_token"):
            return protocol.CLOSE_POLICY_VIOLATION, "device" if arg == "unknown" else "token"
        if arg == "old_protocol":
            return protocol.CLOSE_PROTOCOL_ERROR, "protocol"
        return None, ""
    if kind == "hello":
        return protocol.CLOSE_PROTOCOL_ERROR, "hello"
    if kind == "ready" and not awaiting_ready:
        return protocol.CLOSE_PROTOCOL_ERROR, "ready"
    if kind == "reply":
        reply_type, value = arg
        # "missed" (a device lost that round) may answer any request keyed by that round
        # "missed" (the device lost that round) answers any request keyed by its round
        types = [t for t in ASKED if t not in KEY] if reply_type == "missed" else [reply_type]
        if not any(value in ASKED.get(t, []) for t in types):
            return protocol.CLOSE_PROTOCOL_ERROR, reply_type
    return None, ""


def weighted(*branches: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """Draw from each strategy in proportion to its weight (``one_of`` would be uniform)."""
    pool = [strategy for weight, strategy in branches for _ in range(weight)]
    return st.sampled_from(pool).flatmap(lambda strategy: strategy)


ASKED_REPLY = st.sampled_from([("reply", (t, v)) for t, vs in ASKED.items() for v in vs])
# replies of any type to any round/seq: mostly never asked, or asked under another type
ANY_REPLY = st.tuples(
    st.just("reply"), st.tuples(st.sampled_from(sorted(REPLY_TYPES)), st.integers(0, 6))
)
# One frame after the first: acceptable frames come often enough that sequences reach deep
# states before something breaks the rules.
ANY_OP: st.SearchStrategy[Op] = weighted(
    (6, ASKED_REPLY),
    (4, st.tuples(st.sampled_from(["telemetry", "bye", "error", "ready"]), st.none())),
    (2, ANY_REPLY),
    (1, st.tuples(st.just("hello"), st.sampled_from(sorted(HELLOS)))),
    (1, st.tuples(st.just("junk"), st.binary(max_size=40).filter(_undecodable))),
    (1, st.tuples(st.sampled_from(["text", "oversized"]), st.none())),
)
# Most sequences should get past admission, or the state checks would rarely be reached.
FIRST: st.SearchStrategy[Op] = weighted(
    (4, st.just(("hello", "ok"))),
    (2, st.just(("hello", "rejoin"))),
    (1, st.tuples(st.just("hello"), st.sampled_from(sorted(HELLOS)))),
    (1, ANY_OP),
)
# At most 8 frames after hello: with a queue bound of 8, flooding is not what this test probes.
SEQUENCES = st.builds(
    lambda first, rest: [first, *rest], FIRST, st.lists(ANY_OP, min_size=1, max_size=8)
)


async def fuzz_scenario(ops: list[Op], was_ready: bool) -> None:
    async with running() as server:
        if was_ready:  # as if an earlier connection of the device had taken the job
            server.sessions["fuzz"].ready.set()
        for reply_type, values in ASKED.items():
            for v in values:
                server.sessions["fuzz"].expect(reply_type, KEY.get(reply_type, "round"), v)
        good_peer: list[str] = []
        good = asyncio.ensure_future(good_device(server.url, good_peer))
        try:
            checked, (code, reason) = await within(
                asyncio.gather(drive_good(server), peer(server, [frame_of(op) for op in ops]))
            )
            await within(good)
        finally:
            good.cancel()
            await asyncio.gather(good, return_exceptions=True)
        want_code, word, at = predict(ops, was_ready)
        assert checked == 8
        recorded = {f["code"] for f in server.closes()}
        # websockets enforces max_size as it reads, ahead of the handler: an oversized frame sent
        # right behind the offending one may close the connection first, with 1009.
        if code == protocol.CLOSE_MESSAGE_TOO_BIG and ("oversized", None) in ops[at + 1 :]:
            assert want_code is not None and recorded & {want_code, code}, server.events
        else:
            assert code == want_code, (ops, reason)
            assert word.lower() in (reason or "").lower(), (ops, reason)
            assert code is None or code in recorded, server.events
        if code is not None:
            assert code in ERROR_CODES and reason
        # the well-behaved connection was never refused (a fuzzed hello may name its device)
        assert good_peer and all(f["peer"] != good_peer[0] for f in server.closes()), server.events
    if want_code is None:  # an admitted peer that leaves is still recorded
        assert ("lost", "fuzz") in [(e, d) for e, d, _ in server.events]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=SEQUENCES, was_ready=st.booleans())
def test_fuzzing_peer_is_judged_by_state_while_a_good_device_works(
    ops: list[Op], was_ready: bool
) -> None:
    asyncio.run(fuzz_scenario(ops, was_ready))


# --- plain cases ---------------------------------------------------------------------------


def run(scenario: Callable[[Server], Awaitable[None]]) -> None:
    async def main() -> None:
        async with running() as server:
            await within(scenario(server))

    asyncio.run(main())


async def joined(server: Server, ws: Any, device: str = "fuzz") -> None:
    """Admit ``ws`` as ``device`` with a fresh job and answer it with ready."""
    await ws.send(hello(device, TOKENS[device]))
    assert (await recv(ws)).type == "job"
    await ws.send(ready())
    await within(server.sessions[device].ready.wait())


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
