"""Fleet sessions: admission of the listed devices and request/reply over their connections.

A :class:`DeviceSession` outlives any one WebSocket: when a device's link drops and it dials
back with its id and token, the new connection is attached to the same session and a request
that was in flight is sent again (the agent answers a repeated request idempotently).
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import time
from typing import Any, Callable

from edge_agent import protocol
from edge_agent.protocol import Message, ProtocolError, decode, encode
from orchestrator.config.manifest import DeviceConfig
from orchestrator.errors import FleetError

# Markers put in a session's reply queue by the connection handler.
_DROPPED = object()  # the connection went away: resend after the device is back
_FAILED = object()  # the device reported that it cannot carry out the job

REPLY_TYPES = frozenset(
    {"activations", "client_grad", "eval_result", "echo_reply", "bench_result", "missed"}
)
# Requests remembered per reply type. A device that stalls (SIGSTOP, swapping) is asked again
# every round and answers the backlog in order once it resumes: those replies are late, not
# forged, so the window covers many rounds of lag, not just the request in flight.
EXPECTED_PER_TYPE = 64
HELLO_TIMEOUT_S = 10.0
SEND_TIMEOUT_S = 60.0


class DeviceAbsent(Exception):
    """A device cannot answer this request: it is away past its patience, or lost the round."""

    def __init__(self, device: str, why: str) -> None:
        super().__init__(f"device {device} {why}")
        self.device = device
        self.why = why


class DeviceSession:
    """One device listed in the manifest, whatever connection it currently has."""

    def __init__(self, cfg: DeviceConfig, rank: int) -> None:
        self.cfg = cfg
        self.id = cfg.id
        self.rank = rank
        self.ws: Any = None
        self.connected = asyncio.Event()
        self.ready = asyncio.Event()  # the device holds the current job
        # Replies only come when asked for, one request at a time: a small bound is plenty, and
        # a device that overflows it is flooding us.
        self.replies: asyncio.Queue[Any] = asyncio.Queue(maxsize=8)
        self.facts: dict[str, Any] = {}
        self.stats: dict[str, Any] = {}
        self.status = "waiting"
        self.away_since: float | None = time.monotonic()  # None while connected
        self.failure: str | None = None
        self.shard_size = 0
        self.last_gradient: tuple[int, bytes] | None = None  # resent to a device that missed it
        # reply type -> (the field tying a reply to its request, values recently asked for)
        self.expected: dict[str, tuple[str, collections.deque[int]]] = {}
        self.awaiting_ready = False  # a job went out on this session and no ready came back yet

    async def send(self, frame: bytes) -> bool:
        """Send on the current connection; False when there is none (the device is away)."""
        from websockets.exceptions import ConnectionClosed

        ws = self.ws
        if ws is None:
            return False
        try:
            # A peer that stops reading fills the socket buffers; do not wait on it forever.
            await asyncio.wait_for(ws.send(frame), SEND_TIMEOUT_S)
        except ConnectionClosed:
            return False
        except asyncio.TimeoutError:
            await ws.close(protocol.CLOSE_GOING_AWAY, "not reading")
            return False
        return True

    async def call(
        self,
        frame: bytes,
        reply_type: str,
        round_: int,
        timeout_s: float,
        key: str = "round",
        patience_s: float | None = None,
    ) -> Message:
        """Send a request and wait for its reply, resending after a reconnect.

        Raises TimeoutError after ``timeout_s``, FleetError if the device reports a failed job,
        and DeviceAbsent when it answers ``missed`` or, with ``patience_s``, has been
        disconnected that long. Cancelling is safe: a late reply is discarded by its round.
        """
        try:
            return await asyncio.wait_for(
                self._call(frame, reply_type, round_, key, patience_s), timeout_s
            )
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"device {self.id} did not answer {reply_type} of round {round_} within {timeout_s:.0f} s"
            ) from None

    async def _call(
        self, frame: bytes, reply_type: str, round_: int, key: str, patience_s: float | None
    ) -> Message:
        self.expect(reply_type, key, round_)
        while True:
            await self._wait_connected(patience_s)
            if not await self.send(frame):
                continue
            while True:
                item = await self.replies.get()
                if item is _DROPPED:
                    break  # wait for the device to come back, then ask again
                if item is _FAILED:
                    raise FleetError(f"device {self.id} failed its job: {self.failure}")
                if item.type == "missed" and item["round"] == round_ and key == "round":
                    raise DeviceAbsent(self.id, "restarted and lost this round's work")
                if item.type == reply_type and item.get(key) == round_:
                    return item  # type: ignore[no-any-return]
                # anything else is a stale reply to an earlier, resent request: drop it

    def away_s(self) -> float:
        """How long the device has been disconnected (0 while it is connected)."""
        return 0.0 if self.away_since is None else time.monotonic() - self.away_since

    async def _wait_connected(self, patience_s: float | None) -> None:
        if self.connected.is_set():
            return
        if patience_s is None:
            await self.connected.wait()
            return
        left = patience_s - self.away_s()
        if left > 0:
            try:
                await asyncio.wait_for(self.connected.wait(), left)
                return
            except asyncio.TimeoutError:
                pass
        raise DeviceAbsent(self.id, f"disconnected for more than {patience_s:.0f} s")

    def fail(self, reason: str) -> None:
        """The device cannot go on (its local agent died for good): fail its pending call."""
        self.failure = self.failure or reason
        self._push(_FAILED)

    def expect(self, reply_type: str, key: str, value: int) -> None:
        """Note a reply this device has been asked for (checked when replies arrive)."""
        entry = self.expected.get(reply_type)
        if entry is None or entry[0] != key:
            entry = (key, collections.deque(maxlen=EXPECTED_PER_TYPE))
            self.expected[reply_type] = entry
        values = entry[1]
        if value in values:  # asked again (a resend, a reused probe seq): now the newest
            values.remove(value)
        values.append(value)

    def solicited(self, msg: Message) -> bool:
        """Whether ``msg`` answers a request recently sent on this session (late ones count)."""
        if msg.type == "missed":  # "this round is lost here" may answer any request of the round
            return any(
                key == "round" and msg["round"] in values for key, values in self.expected.values()
            )
        entry = self.expected.get(msg.type)
        return entry is not None and msg.get(entry[0]) in entry[1]

    def _push(self, item: Any) -> None:
        try:
            self.replies.put_nowait(item)
        except asyncio.QueueFull:
            if item is _DROPPED or item is _FAILED:
                # make room: old replies are stale once the connection is gone
                while not self.replies.empty():
                    self.replies.get_nowait()
                self.replies.put_nowait(item)
            else:
                raise ProtocolError(protocol.CLOSE_PROTOCOL_ERROR, "unsolicited replies") from None


class Admission:
    """The WebSocket handler: checks ``hello``, attaches connections to sessions, reads frames.

    ``job_frame(session)`` returns the job to send a device that does not hold the current run;
    ``on_event(event, device, fields)`` and ``on_telemetry(session)`` report to the run state.
    """

    def __init__(
        self,
        sessions: dict[str, DeviceSession],
        run_id: str,
        job_frame: Callable[[DeviceSession], bytes],
        on_event: Callable[..., None],
        on_telemetry: Callable[[DeviceSession], None],
    ) -> None:
        self.sessions = sessions
        self.run_id = run_id
        self.job_frame = job_frame
        self.on_event = on_event
        self.on_telemetry = on_telemetry
        self.closing = False

    async def handler(self, ws: Any) -> None:
        """Serve one connection until it closes. Cancelling is safe."""
        from websockets.exceptions import ConnectionClosed

        peer = _peer(ws)
        session: DeviceSession | None = None
        try:
            try:
                first = await asyncio.wait_for(ws.recv(), HELLO_TIMEOUT_S)
            except asyncio.TimeoutError:
                await self._refuse(
                    ws, None, peer, protocol.CLOSE_PROTOCOL_ERROR, "no hello in time"
                )
                return
            session = await self._admit(ws, first, peer)
            if session is None:
                return
            async for frame in ws:
                self._dispatch(session, decode(frame, protocol.AGENT_TYPES))
        except ProtocolError as exc:
            device = session.id if session is not None else None
            await self._refuse(ws, device, peer, exc.code, exc.reason, event="bad_frame")
        except ConnectionClosed as exc:
            code = exc.sent.code if exc.sent is not None else None
            if code == protocol.CLOSE_MESSAGE_TOO_BIG:
                self.on_event(
                    "bad_frame",
                    session.id if session else None,
                    {
                        "code": code,
                        "peer": peer,
                        "reason": "frame larger than testbed.max_message_bytes",
                    },
                )
        finally:
            if session is not None and session.ws is ws:
                session.ws = None
                session.connected.clear()
                session.away_since = time.monotonic()
                session._push(_DROPPED)
                if not self.closing:
                    session.status = "lost"
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
        resume = hello.get("resume") or {}
        if not isinstance(resume.get("run_id", ""), str) or not _is_int(resume.get("round", 0)):
            reason = "hello.resume must hold a string run_id and an integer round"
            await self._refuse(
                ws, session.id, peer, protocol.CLOSE_INVALID_PAYLOAD, reason, event="bad_frame"
            )
            return None
        old = session.ws
        session.ws = ws
        if old is not None:
            session._push(_DROPPED)  # a request in flight on the old link is asked again
            await old.close(
                protocol.CLOSE_GOING_AWAY, "replaced by a newer connection of this device"
            )
        session.facts = dict(hello["facts"])
        # A device this orchestrator has not yet seen ready (a resumed run) gets the job again,
        # which tells it the round to resume from.
        rejoin = resume.get("run_id") == self.run_id and session.ready.is_set()
        self.on_event("rejoined" if rejoin else "joined", session.id, {"peer": peer})
        if not rejoin:
            session.ready.clear()
            session.awaiting_ready = True  # set before sending: the ready may come back at once
            await asyncio.wait_for(ws.send(self.job_frame(session)), SEND_TIMEOUT_S)
        elif (
            session.last_gradient is not None and resume.get("round", 0) < session.last_gradient[0]
        ):
            await asyncio.wait_for(ws.send(session.last_gradient[1]), SEND_TIMEOUT_S)
        session.status = "joined"
        session.away_since = None
        session.connected.set()
        return session

    def _dispatch(self, session: DeviceSession, msg: Message) -> None:
        kind = msg.type
        if kind in REPLY_TYPES:
            # A reply must answer something this session asked; anything else is a forged or
            # confused peer, and queueing it would only hide the bug until the queue overflows.
            if not session.solicited(msg):
                raise ProtocolError(protocol.CLOSE_PROTOCOL_ERROR, _unasked(session, msg))
            session._push(msg)
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
                },
            )
        elif kind == "telemetry":
            session.stats = dict(msg["stats"])
            self.on_telemetry(session)
        elif kind == "error":
            session.failure = f"{msg['code']}: {msg['message']}"
            self.on_event("device_error", session.id, {"message": session.failure})
            session._push(_FAILED)
        elif kind == "hello":
            raise ProtocolError(protocol.CLOSE_PROTOCOL_ERROR, "hello after admission")
        # "bye" needs no action: the agent closes the connection next.

    async def _refuse(
        self, ws: Any, device: str | None, peer: str, code: int, reason: str, event: str = "refused"
    ) -> None:
        self.on_event(event, device, {"code": code, "reason": reason, "peer": peer})
        try:
            await asyncio.wait_for(
                ws.send(encode("error", code=str(code), message=reason)), HELLO_TIMEOUT_S
            )
        except Exception:  # the peer may already be gone or not reading; closing is what matters
            pass
        await ws.close(code, reason[:120])


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


async def wait_ready(
    sessions: list[DeviceSession], timeout_s: float, tick: Callable[[list[str]], None]
) -> None:
    """Wait until every device holds the job; ``tick(missing)`` runs about once a second."""
    deadline = time.monotonic() + timeout_s
    while True:
        missing = [s.id for s in sessions if not s.ready.is_set()]
        failed = [s for s in sessions if s.failure]
        if failed:
            raise FleetError("; ".join(f"device {s.id} failed: {s.failure}" for s in failed))
        if not missing:
            return
        tick(missing)
        left = deadline - time.monotonic()
        if left <= 0:
            raise FleetError(f"devices did not join within {timeout_s:.0f} s: {', '.join(missing)}")
        waits = [asyncio.ensure_future(s.ready.wait()) for s in sessions if not s.ready.is_set()]
        try:
            await asyncio.wait(waits, timeout=min(1.0, left), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
