"""Device emulation, so one machine can host a heterogeneous testbed.

Compute slowdown pads each compute step in proportion to the work it really did, and a fixed
compute cost adds the same time to every step whatever its batch (what a call costs on a device
before any sample is touched: kernel launches, interpreter overhead, waking a core); the link is
shaped in the agent's transport: a one-way delay of rtt/2 on each direction and a serialisation
delay of size/bandwidth (a token bucket refilled at the given rate, one frame at a time).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass


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
    """Delays for one direction: serialisation at ``mbps`` plus half the round-trip time."""

    def __init__(self, mbps: float, rtt_ms: float) -> None:
        self._bytes_per_s = mbps * 1e6 / 8 if mbps > 0 else 0.0
        self._one_way_s = rtt_ms / 2000.0
        self._free_at = 0.0  # when the emulated link finishes the previous frame

    async def pass_frame(self, size: int, entered: float | None = None) -> None:
        """Wait until a frame of ``size`` bytes that entered the link at ``entered`` (default:
        now) would have come out of it. Safe to cancel."""
        now = time.monotonic()
        start = now if entered is None else entered
        busy = size / self._bytes_per_s if self._bytes_per_s else 0.0
        self._free_at = max(self._free_at, start) + busy
        delay = self._free_at - now + self._one_way_s
        if delay > 0:
            await asyncio.sleep(delay)


def pad_compute(seconds: float, profile: EmulationProfile) -> float:
    """Stretch a compute step that took ``seconds`` to what it costs on the emulated device
    (:meth:`EmulationProfile.compute_s`), which is returned."""
    emulated = profile.compute_s(seconds)
    if emulated > seconds and seconds >= 0:
        time.sleep(emulated - seconds)
    return emulated
