"""Fleet sessions: one :class:`DeviceSession` per listed device, and request/reply over it.

A session outlives any one WebSocket: when a device's link drops and it dials back with its id
and token, the new connection is attached to the same session (by :mod:`.admission`) and a
request that was in flight is sent again (the agent answers a repeated request idempotently).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable
from typing import Any, Callable, TypeVar

from edge_agent import protocol
from edge_agent.protocol import Message, ProtocolError
from orchestrator.config.manifest import DeviceConfig
from orchestrator.errors import FleetError
from orchestrator.names import DeviceStatus

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
# One frame to a device may be a whole job (its data shard and initial weights, up to
# testbed.max_message_bytes) over a slow lab link: a minute is generous for that, yet short
# enough that a peer which stopped reading (full socket buffers) does not hold a round forever.
SEND_TIMEOUT_S = 60.0
# websockets' own bound on the closing handshake (serve's close_timeout) normally ends a close;
# this outer bound catches the one case it cannot: a close frame queued behind unread data of a
# peer that stopped reading, whose drain never returns. Past it the TCP connection is aborted.
CLOSE_TIMEOUT_S = 10.0
# wait_ready reports the devices still missing about this often (the dashboard's waiting line).
READY_TICK_S = 1.0


T = TypeVar("T")
_timeout = getattr(asyncio, "timeout", None)  # Python 3.11+


async def within(aw: Awaitable[T], timeout_s: float) -> T:
    """``asyncio.wait_for(aw, timeout_s)`` without the task it wraps ``aw`` in where Python has
    ``asyncio.timeout``: every device's sends and calls go through here, every round."""
    if _timeout is None:
        return await asyncio.wait_for(aw, timeout_s)
    async with _timeout(timeout_s):
        return await aw


async def close_within(ws: Any, code: int, reason: str, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
    """Close ``ws`` with ``code`` and ``reason``; abort the connection if that takes too long.

    Never raises for a connection that is already gone. Cancelling is safe.
    """
    try:
        await asyncio.wait_for(ws.close(code, reason), timeout_s)
    except asyncio.TimeoutError:
        transport = getattr(ws, "transport", None)
        if transport is not None:
            transport.abort()  # releases the stuck drain: connection_lost wakes its waiters


async def send_within(
    ws: Any,
    frame: bytes,
    timeout_s: float = SEND_TIMEOUT_S,
    close_timeout_s: float = CLOSE_TIMEOUT_S,
) -> bool:
    """Send ``frame`` on ``ws``; False if the connection is closed or the peer is not reading.

    A peer that stops reading fills the socket buffers: past ``timeout_s`` its connection is
    closed (1001 "not reading", see :func:`close_within`), so whoever waits on the device hears
    of a drop instead of nothing. Cancelling is safe.
    """
    from websockets.exceptions import ConnectionClosed

    try:
        await within(ws.send(frame), timeout_s)
    except ConnectionClosed:
        return False
    except asyncio.TimeoutError:
        await close_within(ws, protocol.CLOSE_GOING_AWAY, "not reading", close_timeout_s)
        return False
    return True


class DeviceAbsent(Exception):
    """A device cannot answer this request: it is away past its patience, or lost the round.

    Not a :class:`~orchestrator.errors.GapslError`: a signal that :class:`SessionGroup` always
    turns into "this device sits out", never a failure to report (see ``orchestrator.errors``).
    """

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
        # A DeviceStatus; typed str while other writers still assign the plain strings.
        self.status: str = DeviceStatus.WAITING
        self.away_since: float | None = time.monotonic()  # None while connected
        self.failure: str | None = None
        self.shard_size = 0
        self.last_gradient: tuple[int, bytes] | None = None  # resent to a device that missed it
        # reply type -> (the field tying a reply to its request, values recently asked for)
        self.expected: dict[str, tuple[str, collections.deque[int]]] = {}
        self.awaiting_ready = False  # a job went out on this session and no ready came back yet
        self.admitted_once = False  # admitted at least once by this orchestrator
        # A device back after a time away: when it went away, until it can work again (the
        # ``returned`` event says how long that took).
        self.returning_since: float | None = None

    async def send(self, frame: bytes) -> bool:
        """Send on the current connection; False when there is none (the device is away) or the
        device stopped reading for ``SEND_TIMEOUT_S`` (its connection is then closed)."""
        ws = self.ws
        if ws is None:
            return False
        return await send_within(ws, frame)

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
            return await within(self._call(frame, reply_type, round_, key, patience_s), timeout_s)
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

    def ping_ms(self) -> float | None:
        """The websockets keepalive's last measured ping round trip, in ms."""
        latency = getattr(self.ws, "latency", 0.0) if self.ws is not None else 0.0
        return latency * 1000.0 if latency else None

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

    # --- what the connection handler (admission) tells the session ----------------------------

    def attach(self, ws: Any) -> Any:
        """Make ``ws`` the device's connection; returns the one it replaces (None if none).

        A request in flight on the replaced link is asked again on the new one.
        """
        old, self.ws = self.ws, ws
        if old is not None:
            self.resend_pending()
        return old

    def mark_connected(self) -> None:
        """The attached connection is admitted: requests may go out on it."""
        self.status = DeviceStatus.JOINED
        self.away_since = None
        self.admitted_once = True
        self.connected.set()

    def detach(self, ws: Any) -> bool:
        """``ws`` closed; False if it was no longer the device's connection (replaced)."""
        if self.ws is not ws:
            return False
        self.ws = None
        self.connected.clear()
        self.away_since = time.monotonic()
        self.resend_pending()
        return True

    def resend_pending(self) -> None:
        """Wake a pending call to send its request again once the device is (back) connected."""
        self._push(_DROPPED)

    def deliver(self, msg: Message) -> None:
        """Hand a reply to the pending call; ProtocolError (1002) if the device floods us."""
        self._push(msg)

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


async def wait_ready(
    sessions: list[DeviceSession], timeout_s: float, tick: Callable[[list[str]], None]
) -> None:
    """Wait until every device holds the job; ``tick(missing)`` runs about once a second.

    ``timeout_s`` is ``testbed.join_timeout_s``. Cancelling is safe.
    """
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
            await asyncio.wait(
                waits, timeout=min(READY_TICK_S, left), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for w in waits:
                w.cancel()
