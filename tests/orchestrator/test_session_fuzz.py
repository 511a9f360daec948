"""The session state machine under fire: every agent frame is checked against what its session
asked for. A fuzzing peer sends schema-valid messages in any order over a real localhost
WebSocket while a well-behaved device on the same orchestrator completes its exchanges.

The plain cases (one rule each) are in ``test_session_cases.py``; the server and the frame
builders both use are in ``session_harness.py``."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect

from edge_agent import protocol
from edge_agent.protocol import ProtocolError, decode, encode
from orchestrator.fleet.sessions import REPLY_TYPES

from .session_harness import (
    ASKED,
    ERROR_CODES,
    KEY,
    MAX_BYTES,
    TOKENS,
    WAIT_S,
    Server,
    hello,
    peer,
    ready,
    recv,
    reply,
    running,
    within,
)

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
