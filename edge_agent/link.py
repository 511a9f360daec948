"""One connection to the orchestrator as the agent's handlers use it: frames out through the
emulated uplink, frames in stamped when their first byte arrived and delayed by the emulated
downlink, and every send and receive bounded by a timeout from
:class:`~edge_agent.config.AgentConfig`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from . import protocol
from .config import AgentConfig
from .emulation import LinkShaper
from .errors import LinkTimeout
from .protocol import encode
from .telemetry import live_stats

# A close reason must fit a control frame: 123 bytes after the code (RFC 6455 section 5.5).
REASON_CHARS = 120
# Frames wait here while a handler computes; the bound is the backpressure on the reader. The
# orchestrator keeps one request in flight per device, so a healthy run never comes near it.
INBOX_FRAMES = 64


def first_byte_at(ws: Any) -> float:
    """When the message just received from ``ws`` began to arrive, as a
    :class:`~edge_agent.arrival.StampedConnection` noted it (now, when not known); the next
    message's stamp starts afresh."""
    now = time.monotonic()
    stamp = getattr(ws, "first_byte", None)
    if stamp is None:
        return now
    ws.first_byte = None
    return min(stamp, now)


class Link:
    """A websockets connection with the link emulation applied and every wait bounded."""

    def __init__(self, ws: Any, cfg: AgentConfig, up: LinkShaper, down: LinkShaper) -> None:
        self.ws = ws
        self._cfg, self._up, self._down = cfg, up, down
        self.inbox: asyncio.Queue[Any] = asyncio.Queue(maxsize=INBOX_FRAMES)

    async def send(self, frame: bytes) -> None:
        """Send through the emulated uplink; LinkTimeout after ``send_timeout_s`` on the wire
        (beyond the time the emulated link itself takes)."""
        paced = self._up.paced(frame)
        if paced is None:
            await self._up.pass_frame(len(frame))
            await self._send_now(frame)
        else:  # fragments of one message (RFC 6455 section 5.4), so the real send overlaps
            await self._send_now(paced[0], len(frame), paced[1])

    async def _send_now(
        self, frame: bytes | AsyncIterator[bytes], size: int = 0, shaped_s: float = 0.0
    ) -> None:
        limit = self._cfg.send_timeout_s
        try:
            await asyncio.wait_for(self.ws.send(frame), limit + shaped_s)
        except asyncio.TimeoutError:  # TimeoutError itself only from Python 3.11
            size = size or len(frame)  # type: ignore[arg-type]
            raise LinkTimeout(f"a {size}-byte frame was not sent in {limit:g} s") from None

    async def close(self, code: int, reason: str) -> None:
        """The closing handshake, bounded by websockets' ``close_timeout``."""
        await self.ws.close(code, reason[:REASON_CHARS])

    async def receive(self) -> bytes | None:
        """The next frame, once the emulated downlink has delivered it; None after a clean close.

        Raises the connection's ConnectionClosed, or LinkTimeout when the orchestrator has sent
        nothing for ``idle_timeout_s``. Needs :meth:`read` running.
        """
        item = await self.inbox.get()
        if item is None:
            return None
        if isinstance(item, BaseException):
            raise item
        first, arrived, frame = item
        await self._down.pass_frame(len(frame), first, arrived)
        return frame

    async def read(self) -> None:
        """Run as a task: stamp each frame with when its first byte arrived, so the emulated
        downlink delays frames from when they reached this device, not from when the last byte
        was read or a busy handler got round to them. Ends
        with None (clean close), the closing exception, or a LinkTimeout in the inbox."""
        from websockets.exceptions import ConnectionClosed, ConnectionClosedOK

        idle_s = self._cfg.idle_timeout_s
        while True:
            try:
                # websockets' recv is safe to cancel: a frame is either returned or kept.
                frame = await asyncio.wait_for(self.ws.recv(), idle_s)
            except ConnectionClosedOK:
                await self.inbox.put(None)
                return
            except ConnectionClosed as exc:
                await self.inbox.put(exc)
                return
            except asyncio.TimeoutError:
                await self.inbox.put(LinkTimeout(f"no frame from the orchestrator in {idle_s:g} s"))
                return
            await self.inbox.put((first_byte_at(self.ws), time.monotonic(), frame))

    async def telemetry(self) -> None:
        """Run as a task: load figures every ``telemetry_every_s``, past the link emulation (they
        are not measured traffic). A stalled link is closed, so that :meth:`read` reports it."""
        while True:
            await asyncio.sleep(self._cfg.telemetry_every_s)
            stats = await asyncio.to_thread(live_stats)
            try:
                await self._send_now(encode("telemetry", stats=stats))
            except LinkTimeout as exc:
                await self.close(protocol.CLOSE_GOING_AWAY, str(exc))
                return
