"""Admission: the WebSocket handler that checks ``hello``, refuses or admits, and reads frames.

The wire behaviour of DESIGN.md lives here: bad token or unknown device closes 1008, an
undecodable or out-of-protocol frame 1002/1003/1007, an oversized one 1009 — each with a reason
and an event — and the orchestrator keeps serving everyone else. A connection past the
pending cap closes 1013 (``orchestrator.fleet.gate``), and refusals before admission go to the
event log through its summary. They also count against their source, which is reset at accept
once it has failed too often (``orchestrator.fleet.penalty``), unless a device was admitted
from there.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from typing import Any, Callable

from edge_agent import protocol
from edge_agent.protocol import Message, ProtocolError, decode, encode
from orchestrator.fleet.gate import PendingGate, RefusalLog, host_of
from orchestrator.fleet.penalty import FAILURE_CODES
from orchestrator.fleet.sessions import (
    REPLY_TYPES,
    DeviceSession,
    close_within,
    send_within,
)
from orchestrator.names import DeviceStatus

# A connection that does not say hello in this time is refused (testbed.hello_timeout_s's
# default): an agent sends it right after the handshake, so anything slower is a port scanner
# or a confused peer holding a slot open.
HELLO_TIMEOUT_S = 5.0
# The refusal's error frame is a courtesy before the close that matters: do not wait long on it.
REFUSE_SEND_TIMEOUT_S = 5.0
# The close of a connection over testbed.max_pending_connections (RFC 6455 §7.4.1 via the IANA
# registry: 1013 "Try Again Later"); an honest agent redials with backoff.
CLOSE_TRY_AGAIN_LATER = 1013
# What ``joined``/``rejoined`` events carry of a device's hello facts (name -> type), so that the
# run's records alone tell who joined: the dashboard's ``watch`` view is rebuilt from them.
HELLO_FACTS: dict[str, type] = {
    "hostname": str,
    "platform": str,  # e.g. "Linux aarch64"
    "torch_device": str,  # "cpu" | "cuda" | "mps"; "" until the agent has its job
    "cpu_count": int,
    "memory_bytes": int,
}
# A fact is the device's word: longer strings are cut before they go into the run's records.
FACT_MAX_CHARS = 200
# A close reason must fit a control frame (125 bytes, RFC 6455 §5.5) with its 2-byte code.
CLOSE_REASON_MAX_CHARS = 120


class Admission:
    """The WebSocket handler: checks ``hello``, attaches connections to sessions, reads frames.

    ``job_frame(session)`` returns the job to send a device that does not hold the current run;
    ``on_event(event, device, fields)`` and ``on_telemetry(session)`` report to the run state.
    ``gate`` caps the connections not yet admitted (``testbed.max_pending_connections``; None:
    no cap) and holds the per-source penalties that failures here count towards;
    ``refusals`` writes refusals before admission (None: one event each) and
    ``hello_timeout_s`` bounds the wait for the first frame.
    """

    def __init__(
        self,
        sessions: dict[str, DeviceSession],
        run_id: str,
        job_frame: Callable[[DeviceSession], bytes],
        on_event: Callable[..., None],
        on_telemetry: Callable[[DeviceSession], None],
        *,
        gate: PendingGate | None = None,
        refusals: RefusalLog | None = None,
        hello_timeout_s: float = HELLO_TIMEOUT_S,
    ) -> None:
        self.sessions = sessions
        self.gate = gate
        self.penalty = gate.penalty if gate is not None else None
        self.refusals = refusals
        self.hello_timeout_s = hello_timeout_s
        self.run_id = run_id
        self.job_frame = job_frame
        self.on_event = on_event
        self.on_telemetry = on_telemetry
        self.closing = False

    async def handler(self, ws: Any) -> None:
        """Serve one connection until it closes. Cancelling is safe.

        Reading frames after admission has no timeout of its own: the server's keepalive
        (``testbed.ping_interval_s`` / ``ping_timeout_s``) ends a connection that went silent.
        """
        from websockets.exceptions import ConnectionClosed

        peer = _peer(ws)
        session: DeviceSession | None = None
        try:
            if self.gate is not None and self.gate.over(ws):
                # No error frame: over the cap, every byte spent on a refusal is a byte too many.
                self._note("refused", None, CLOSE_TRY_AGAIN_LATER, "try again later", peer)
                await close_within(ws, CLOSE_TRY_AGAIN_LATER, "try again later")
                return
            try:
                first = await asyncio.wait_for(ws.recv(), self.hello_timeout_s)
            except asyncio.TimeoutError:
                await self._refuse(
                    ws, None, peer, protocol.CLOSE_PROTOCOL_ERROR, "no hello in time"
                )
                return
            session = await self._admit(ws, first, peer)
            if session is None:
                return
            if self.gate is not None:
                self.gate.release(ws)  # admitted: no longer pending
            async for frame in ws:
                self._dispatch(session, decode(frame, protocol.AGENT_TYPES))
        except ProtocolError as exc:
            device = session.id if session is not None else None
            await self._refuse(
                ws, device, peer, exc.code, exc.reason, event="bad_frame", admitted=True
            )
        except ConnectionClosed as exc:
            code = exc.sent.code if exc.sent is not None else None
            if code == protocol.CLOSE_MESSAGE_TOO_BIG:
                reason = "frame larger than testbed.max_message_bytes"
                if session is None:  # before admission: summarised, and held against the source
                    self._note("bad_frame", None, code, reason, peer)
                else:
                    self.on_event(
                        "bad_frame", session.id, {"code": code, "peer": peer, "reason": reason}
                    )
        finally:
            if session is not None and session.detach(ws) and not self.closing:
                session.status = DeviceStatus.LOST
                self.on_event("lost", session.id, {"code": ws.close_code})

    async def _admit(self, ws: Any, first: Any, peer: str) -> DeviceSession | None:
        try:
            hello = decode(first, protocol.AGENT_TYPES)
        except ProtocolError as exc:
            await self._refuse(ws, None, peer, exc.code, exc.reason, event="bad_frame")
            return None
        if hello.type != "hello":
            await self._refuse(
                ws, None, peer, protocol.CLOSE_PROTOCOL_ERROR, "the first frame must be hello"
            )
            return None
        if hello["protocol"] != protocol.PROTOCOL_VERSION:
            reason = f"protocol {hello['protocol']} not supported (this orchestrator speaks {protocol.PROTOCOL_VERSION})"
            await self._refuse(ws, hello["device_id"], peer, protocol.CLOSE_PROTOCOL_ERROR, reason)
            return None
        session = self.sessions.get(hello["device_id"])
        # Compare tokens in constant time; an unknown id still pays for one comparison.
        expected = session.cfg.token if session is not None else ""
        token_ok = hmac.compare_digest(hello["token"].encode(), expected.encode())
        if session is None or not token_ok:
            reason = "unknown device" if session is None else "bad token"
            await self._refuse(
                ws, hello["device_id"][:64], peer, protocol.CLOSE_POLICY_VIOLATION, reason
            )
            return None
        if self.penalty is not None:
            self.penalty.admitted(host_of(peer))  # a listed device proved itself from there
        resume = hello.get("resume") or {}
        if not isinstance(resume.get("run_id", ""), str) or not _is_int(resume.get("round", 0)):
            reason = "hello.resume must hold a string run_id and an integer round"
            await self._refuse(
                ws, session.id, peer, protocol.CLOSE_INVALID_PAYLOAD, reason, event="bad_frame"
            )
            return None
        if session.admitted_once and session.away_since is not None:
            session.returning_since = session.away_since  # cleared by the "returned" event
        old = session.attach(ws)  # a request in flight on the old link is asked again
        if old is not None:
            await close_within(
                old, protocol.CLOSE_GOING_AWAY, "replaced by a newer connection of this device"
            )
        session.facts = dict(hello["facts"])
        # A device this orchestrator has not yet seen ready (a resumed run) gets the job again,
        # which tells it the round to resume from.
        rejoin = resume.get("run_id") == self.run_id and session.ready.is_set()
        self.on_event(
            "rejoined" if rejoin else "joined",
            session.id,
            {"peer": peer, **reported_facts(session.facts)},
        )
        if not rejoin:
            session.ready.clear()
            session.awaiting_ready = True  # set before sending: the ready may come back at once
            # A device that does not take its job is closed by send_within; the read loop then
            # ends and the device is recorded as lost, free to dial again.
            await send_within(ws, self.job_frame(session))
        elif (
            session.last_gradient is not None and resume.get("round", 0) < session.last_gradient[0]
        ):
            await send_within(ws, session.last_gradient[1])
        session.mark_connected()
        if rejoin:
            self._returned(session, {})  # it kept the job: back at work now
        return session

    def _returned(self, session: DeviceSession, fields: dict[str, Any]) -> None:
        """A device that had been away holds the job again: say how long it was gone."""
        since, session.returning_since = session.returning_since, None
        if since is not None:
            self.on_event(
                "returned", session.id, {"away_s": round(time.monotonic() - since, 3), **fields}
            )

    def _dispatch(self, session: DeviceSession, msg: Message) -> None:
        kind = msg.type
        if kind in REPLY_TYPES:
            # A reply must answer something this session asked; anything else is a forged or
            # confused peer, and queueing it would only hide the bug until the queue overflows.
            if not session.solicited(msg):
                raise ProtocolError(protocol.CLOSE_PROTOCOL_ERROR, _unasked(session, msg))
            session.deliver(msg)
        elif kind == "ready":
            if not session.awaiting_ready:
                raise ProtocolError(
                    protocol.CLOSE_PROTOCOL_ERROR, "ready without a job awaiting it on this session"
                )
            session.awaiting_ready = False
            session.shard_size = msg["shard_size"]
            session.facts["torch_device"] = msg["torch_device"]
            session.ready.set()
            self.on_event(
                "ready",
                session.id,
                {
                    "shard_size": msg["shard_size"],
                    "load_s": round(msg["load_s"], 3),
                    "restored_round": msg.get("restored_round"),
                    # the device picks its torch device with the job: hello may not have it yet
                    **reported_facts({"torch_device": msg["torch_device"]}),
                },
            )
            self._returned(session, {"restored_round": msg.get("restored_round")})
        elif kind == "telemetry":
            session.stats = dict(msg["stats"])
            self.on_telemetry(session)
        elif kind == "error":
            session.failure = f"{msg['code']}: {msg['message']}"
            self.on_event("device_error", session.id, {"message": session.failure})
            session.fail(session.failure)
        elif kind == "hello":
            raise ProtocolError(protocol.CLOSE_PROTOCOL_ERROR, "hello after admission")
        # "bye" needs no action: the agent closes the connection next.

    async def _refuse(
        self,
        ws: Any,
        device: str | None,
        peer: str,
        code: int,
        reason: str,
        event: str = "refused",
        admitted: bool = False,
    ) -> None:
        if admitted:
            self.on_event(event, device, {"code": code, "reason": reason, "peer": peer})
        else:
            self._note(event, device, code, reason, peer)
        try:
            await asyncio.wait_for(
                ws.send(encode("error", code=str(code), message=reason)), REFUSE_SEND_TIMEOUT_S
            )
        except Exception:  # the peer may already be gone or not reading; closing is what matters
            pass
        await close_within(ws, code, reason[:CLOSE_REASON_MAX_CHARS])

    def _note(self, event: str, device: str | None, code: int, reason: str, peer: str) -> None:
        """A refusal before admission: summarised when a flood repeats it (``RefusalLog``)."""
        fields = {"code": code, "reason": reason, "peer": peer}
        if self.refusals is None:
            self.on_event(event, device, fields)
        else:
            self.refusals.note(event, device, fields)
        if self.penalty is not None and code in FAILURE_CODES and peer != "?":
            self.penalty.failed(host_of(peer))


def reported_facts(facts: dict[str, Any]) -> dict[str, Any]:
    """The :data:`HELLO_FACTS` a device sent, as event fields: non-empty strings (cut to
    :data:`FACT_MAX_CHARS`) and non-negative integers; a fact of another type is left out."""
    out: dict[str, Any] = {}
    for name, kind in HELLO_FACTS.items():
        value = facts.get(name)
        if kind is str and isinstance(value, str) and value:
            out[name] = value[:FACT_MAX_CHARS]
        elif kind is int and isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            out[name] = value
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _unasked(session: DeviceSession, msg: Message) -> str:
    """The close reason for a reply nobody asked for, naming the message and its round/seq."""
    entry = session.expected.get(msg.type)
    key = entry[0] if entry is not None else ("seq" if "seq" in msg.fields else "round")
    return f"{msg.type} {key}={msg.get(key)} answers no request sent on this session"


def _peer(ws: Any) -> str:
    addr = getattr(ws, "remote_address", None)
    return f"{addr[0]}:{addr[1]}" if addr else "?"
