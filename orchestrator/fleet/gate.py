"""What stands before admission: a cap on unauthenticated connections, penalised sources reset
at accept, and refusals summarised.

Anyone who can reach ``testbed.listen`` can open connections and send hellos. A connection costs
a file descriptor and buffers from the moment it is accepted, and a refusal costs an event line,
so a flood of either must not grow the orchestrator's memory or its event log without bound
while the run carries on (docs/protocol.md, *Connection limits*).
"""

from __future__ import annotations

import asyncio
import resource
import socket
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from orchestrator.fleet.penalty import PenaltyBox

if TYPE_CHECKING:
    from orchestrator.config.sections import TestbedConfig

# Beyond this many keys (source, reason, ...) being summarised at once, further sources are
# folded into one key with source "*": many source addresses must not mean many lines either.
MAX_SUMMARY_KEYS = 64
# The refusals of connections reset at accept (no code: no WebSocket close was ever sent).
RESET_PENDING = "reset at accept: too many pending connections"
RESET_PENALISED = "reset at accept: source penalised"
# One accept() resets at most this many connections in a row before it hands the loop back;
# the listening socket stays readable, so the rest wait one turn of the loop, not longer.
MAX_RESETS_PER_ACCEPT = 64
# SO_LINGER on, timeout 0: close() sends a TCP RST and leaves no TIME_WAIT socket behind.
_LINGER_RESET = struct.pack("ii", 1, 0)


def host_of(peer: str) -> str:
    """The host of a peer string "host:port" (an IPv6 host holds colons of its own)."""
    return peer.rsplit(":", 1)[0]


def raise_fd_limit() -> tuple[int, int] | None:
    """Raise the soft limit on open files to the hard one; (before, after) if it was raised.

    Every connection holds a descriptor until it is closed, and a default soft limit of 1024
    is reached by a burst of connections long before the pending cap closes them.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft >= hard:
        return None
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if target <= soft:
        return None
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return None
    return soft, target


class PendingGate:
    """Counts connections from accept until admission (or close) against a cap.

    A connection accepted while ``cap`` others are pending is closed with 1013 (try again later)
    as soon as its opening handshake is done; one accepted while twice the cap are pending is
    reset at accept, before it costs a handshake. An admitted connection no longer counts.
    """

    def __init__(
        self,
        cap: int,
        on_reset: Callable[[str, str], None] | None = None,
        penalty: PenaltyBox | None = None,
    ) -> None:
        self.cap = cap
        self.pending = 0
        self.peak = 0
        self.on_reset = on_reset  # (peer "host:port", reason) of a connection reset at accept
        self.penalty = penalty
        self._counted: set[int] = set()
        self._over: set[int] = set()

    def screen(self, host: str) -> str | None:
        """Why a connection from ``host`` just accepted must be reset at once, or None.

        Connections accepted in one burst are counted only once their transports exist, so
        :meth:`accepted` checks the cap again for those this let through."""
        if self.penalty is not None and self.penalty.blocked(host):
            return RESET_PENALISED
        if self.pending >= 2 * self.cap:
            return RESET_PENDING
        return None

    def accepted(self, conn: Any) -> bool:
        """A connection was accepted; False if it must be reset now (far over the cap)."""
        if self.pending >= 2 * self.cap:
            return False
        if self.pending >= self.cap:
            self._over.add(id(conn))  # told 1013 once its handshake is done
        self.pending += 1
        self.peak = max(self.peak, self.pending)
        self._counted.add(id(conn))
        return True

    def over(self, conn: Any) -> bool:
        """Whether ``conn`` came in past the cap (checked once its handshake is done)."""
        return id(conn) in self._over

    def release(self, conn: Any) -> None:
        """``conn`` was admitted or closed: it no longer counts. Idempotent."""
        if id(conn) in self._counted:
            self._counted.discard(id(conn))
            self._over.discard(id(conn))
            self.pending -= 1

    def connection_class(self) -> type:
        """A websockets ``ServerConnection`` that reports to this gate (serve's
        ``create_connection``)."""
        from websockets.asyncio.server import ServerConnection

        gate = self

        class GatedConnection(ServerConnection):
            reset = False

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                if gate.accepted(self):
                    super().connection_made(transport)
                    return
                # Far over the cap: no handler task, no buffers, no handshake; just the reset.
                self.reset = True
                if gate.on_reset is not None:
                    addr = transport.get_extra_info("peername")
                    gate.on_reset(f"{addr[0]}:{addr[1]}" if addr else "?", RESET_PENDING)
                transport.abort()  # type: ignore[attr-defined]

            def connection_lost(self, exc: Exception | None) -> None:
                if self.reset:
                    return  # it never became a connection: nothing waits on it
                gate.release(self)
                super().connection_lost(exc)

        return GatedConnection


class ScreenedSocket(socket.socket):
    """A listening socket whose ``accept`` resets what its gate screens out (``PendingGate.screen``).

    The event loop's accept loop calls ``accept``; a connection refused here costs the accept
    and the reset only: no transport, no WebSocket handshake, no handler task, no buffers.
    """

    __slots__ = ("gate",)
    gate: PendingGate

    def accept(self) -> tuple[socket.socket, Any]:
        for _ in range(MAX_RESETS_PER_ACCEPT):
            conn, addr = super().accept()  # BlockingIOError once none is waiting
            reason = self.gate.screen(str(addr[0]))
            if reason is None:
                return conn, addr
            try:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass  # already reset by the peer: closing is all there is left to do
            conn.close()
            if self.gate.on_reset is not None:
                self.gate.on_reset(f"{addr[0]}:{addr[1]}", reason)
        raise BlockingIOError  # the loop's turn; the listening socket is still readable


def guards(
    tb: TestbedConfig, emit: Callable[[str, str | None, dict[str, Any]], None]
) -> tuple[RefusalLog, PendingGate]:
    """The refusal log and the pending gate (with its per-source penalties) of ``tb``'s limits."""
    refusals = RefusalLog(emit, tb.refusal_summary_s)

    def penalised(host: str, fields: dict[str, Any]) -> None:
        refusals.note("penalised", None, {"peer": host, **fields}, host=host)

    def reset(peer: str, reason: str) -> None:
        refusals.note("refused", None, {"reason": reason, "peer": peer})

    penalty = None
    if tb.penalty_after > 0:
        penalty = PenaltyBox(tb.penalty_after, tb.penalty_s, tb.penalty_max_s, penalised)
    return refusals, PendingGate(tb.max_pending_connections, reset, penalty)


@dataclass
class _Hot:
    """A key with refusals being counted until its next summary line."""

    event: str
    device: str | None
    fields: dict[str, Any]
    count: int = 0
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)


class RefusalLog:
    """Refusals into the event log: the first of a kind at once, repeats as one line per interval.

    A kind is (event, source host, code, reason, device). Its first refusal is written as it
    happens; refusals of the same kind within ``interval_s`` after it are counted, and each
    interval that counted any ends with one line carrying ``count`` (how many since the last
    line), ``interval_s`` and ``summary: true``. An interval with none lets the kind go quiet,
    so its next refusal is again written at once. ``interval_s = 0`` writes every refusal.
    """

    def __init__(self, emit: Callable[[str, str | None, dict[str, Any]], None], interval_s: float):
        self.emit = emit
        self.interval_s = interval_s
        self.total = 0  # every refusal noted, written or counted
        self._hot: dict[tuple[Any, ...], _Hot] = {}

    def note(
        self, event: str, device: str | None, fields: dict[str, Any], host: str | None = None
    ) -> None:
        """One refusal; ``host`` is the source it is summarised under (default: ``peer``'s)."""
        self.total += 1
        if self.interval_s <= 0:
            self.emit(event, device, fields)
            return
        if host is None:
            host = host_of(str(fields.get("peer", "?")))
        key = (event, host, fields.get("code"), fields.get("reason"), device)
        if key not in self._hot and len(self._hot) >= MAX_SUMMARY_KEYS:
            key = (event, "*", fields.get("code"), fields.get("reason"), None)
            host, device = "*", None
        hot = self._hot.get(key)
        if hot is not None:
            hot.count += 1
            return
        if key[1] != "*":
            self.emit(event, device, fields)
            count = 0
        else:
            count = 1
        summary = {"code": fields.get("code"), "reason": fields.get("reason"), "peer": host}
        self._hot[key] = hot = _Hot(event, device, summary, count)
        hot.timer = asyncio.get_running_loop().call_later(self.interval_s, self._flush, key)

    def _flush(self, key: tuple[Any, ...]) -> None:
        hot = self._hot.pop(key)
        if hot.count == 0:
            return  # a quiet interval: the next refusal of this kind is written at once
        self._write(hot)
        hot.count = 0
        self._hot[key] = hot
        hot.timer = asyncio.get_running_loop().call_later(self.interval_s, self._flush, key)

    def _write(self, hot: _Hot) -> None:
        fields = {**hot.fields, "count": hot.count, "interval_s": self.interval_s, "summary": True}
        self.emit(hot.event, hot.device, fields)

    def close(self) -> None:
        """Write what is still counted and stop the timers (the run is ending)."""
        for hot in self._hot.values():
            if hot.timer is not None:
                hot.timer.cancel()
            if hot.count:
                self._write(hot)
        self._hot.clear()
