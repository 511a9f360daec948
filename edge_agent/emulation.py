"""Device emulation, so one machine can host a heterogeneous testbed.

Compute slowdown pads each compute step in proportion to the work it really did, and a fixed
compute cost adds the same time to every step whatever its batch (what a call costs on a device
before any sample is touched: kernel launches, interpreter overhead, waking a core); the link is
shaped in the agent's transport: a one-way delay of rtt/2 on each direction and a serialisation
delay of size/bandwidth (a token bucket refilled at the given rate). The real transfer happens
inside the emulated time, not after it, so that a busy machine does not slow the link down:
frames received are timed from their first byte, frames sent go out in paced fragments.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

# A shaped frame is sent in fragments of what the link passes in this long (at least
# PACE_MIN_BYTES): only the last fragment's real transfer and the last wake-up's lateness then
# add to the emulated time, where a whole frame sent after its delay would add all of its own.
# The floor keeps a slow link from costing a wake-up per few bytes.
PACE_S = 0.005
PACE_MIN_BYTES = 16 * 1024


@dataclass(frozen=True)
class EmulationProfile:
    compute_slowdown: float = 1.0
    compute_fixed_ms: float = 0.0  # added to every compute step (forward, backward)
    uplink_mbps: float = 0.0  # 0 = unlimited
    downlink_mbps: float = 0.0
    rtt_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.compute_slowdown < 1.0:
            raise ValueError("compute_slowdown must be >= 1")
        if min(self.uplink_mbps, self.downlink_mbps, self.rtt_ms) < 0:
            raise ValueError("link figures must be >= 0")
        if self.compute_fixed_ms < 0:
            raise ValueError("compute_fixed_ms must be >= 0")

    @property
    def active(self) -> bool:
        return self != EmulationProfile()

    def compute_s(self, seconds: float) -> float:
        """What a compute step that really took ``seconds`` costs on the emulated device."""
        return seconds * self.compute_slowdown + self.compute_fixed_ms / 1000.0


class LinkShaper:
    """Delays for one direction: serialisation at ``mbps`` plus half the round-trip time.

    ``clock`` and ``sleep`` are the event loop's by default; tests pass their own to make
    wake-ups late without depending on how busy the machine is.
    """

    def __init__(
        self,
        mbps: float,
        rtt_ms: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._bytes_per_s = mbps * 1e6 / 8 if mbps > 0 else 0.0
        self._one_way_s = rtt_ms / 2000.0
        self._free_at = 0.0  # when the emulated link finishes the previous frame
        self._clock, self._sleep = clock, sleep

    def _book(self, size: int, entered: float | None, arrived: float | None = None) -> float:
        """Queue ``size`` bytes that entered at ``entered`` (default: now) and were all in at
        ``arrived`` behind the frames before them; returns when the link starts on them."""
        now = self._clock()
        start = max(self._free_at, now if entered is None else entered)
        busy = size / self._bytes_per_s if self._bytes_per_s else 0.0
        # Through once both the emulated serialisation and the real bytes are: with no rate of
        # its own (unlimited, or the kernel's), the real transfer is the serialisation.
        self._free_at = max(start + busy, start if arrived is None else arrived)
        return start

    async def _until(self, t: float) -> None:
        # Deadlines are absolute, so a late wake-up delays what follows it by nothing.
        delay = t - self._clock()
        if delay > 0:
            await self._sleep(delay)

    async def pass_frame(
        self, size: int, entered: float | None = None, arrived: float | None = None
    ) -> None:
        """Wait until a frame of ``size`` bytes whose first byte entered the link at ``entered``
        (default: now) and whose last came at ``arrived`` would have come out of it. Safe to
        cancel."""
        self._book(size, entered, arrived)
        await self._until(self._free_at + self._one_way_s)

    def paced(self, frame: bytes) -> tuple[AsyncIterator[bytes], float] | None:
        """``frame`` as fragments, each released when the emulated link has passed its last
        byte, and how long the link needs for all of it from now; None when the frame fits one
        fragment (or the rate is unlimited): it goes whole, after :meth:`pass_frame`."""
        piece = max(PACE_MIN_BYTES, int(self._bytes_per_s * PACE_S))
        if not self._bytes_per_s or len(frame) <= piece:
            return None
        start = self._book(len(frame), None)
        return self._pieces(memoryview(frame), start, piece), self._free_at - self._clock()

    async def _pieces(self, frame: memoryview, start: float, piece: int) -> AsyncIterator[bytes]:
        for at in range(0, len(frame), piece):
            end = min(at + piece, len(frame))
            await self._until(start + end / self._bytes_per_s + self._one_way_s)
            yield bytes(frame[at:end])


def pad_compute(seconds: float, profile: EmulationProfile) -> float:
    """Stretch a compute step that took ``seconds`` to what it costs on the emulated device
    (:meth:`EmulationProfile.compute_s`), which is returned."""
    emulated = profile.compute_s(seconds)
    if emulated > seconds and seconds >= 0:
        time.sleep(emulated - seconds)
    return emulated
